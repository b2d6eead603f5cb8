"""LeRobot's own pi0 classes (PI0Policy, PaliGemma + Gemma expert + SigLIP) at tiny widths.

Runs where LeRobot is installed (`make pi0` builds .venv-vla with it; LeRobot needs Python 3.12
and a CUDA build of torch, 5 GB, so `make test` and CI skip it): `.venv-vla/bin/python -m pytest
-m lerobot tests/test_pi0_lerobot.py`.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import sqnr
from torch._dynamo.testing import CompileCounterWithBackend

import fxquant
from fxquant import QuantConfig, quantize_graph
from fxquant.passes.common import META

pytest.importorskip("lerobot.policies.pi0.modeling_pi0", reason="LeRobot is not installed (make pi0)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pi0_lerobot  # noqa: E402

pytestmark = pytest.mark.lerobot
FAST = QuantConfig(rotation_steps=16, w_method="rtn", w_clip="minmax")


@pytest.fixture(scope="module")
def policy():
    return pi0_lerobot.build_policy(1, 1, "cpu", tiny=True)


@pytest.fixture(scope="module")
def quantized(policy):
    model = pi0_lerobot.ChunkPredictor(policy).eval()
    calib = [pi0_lerobot.make_batch(policy, 2, seed, "cpu") for seed in range(2)]
    return model, quantize_graph(model, calib, FAST)


@torch.no_grad()
def test_every_linear_quantized_once_and_the_expert_calibrated_over_every_step(policy, quantized):
    model, gm = quantized
    plan = gm.meta[META]["plan"]
    linears = {name for name, m in policy.named_modules() if isinstance(m, torch.nn.Linear)}
    # the vocabulary heads are excluded by default; every other linear is one site, however often it runs
    assert {s.name.removeprefix("policy.") for s in plan.active_sites()} == {
        name for name in linears if not name.endswith("lm_head")}
    expert_q = next(g for g in plan.groups.values() if any("gemma_expert" in s and "q_proj" in s for s in g.sites))
    steps, chunk = policy.config.num_inference_steps, policy.config.chunk_size
    # 2 batches of 2, every flow step (not only the first), each a state token and the chunk of actions
    assert expert_q.stats["tokens"] == 2 * 2 * steps * (1 + chunk)
    batch = pi0_lerobot.make_batch(policy, 2, 7, "cpu")
    assert sqnr(gm(**batch), model(**batch)) > 15.0


@torch.no_grad()
def test_one_compile_for_batch_sizes_2_3_and_1(policy, quantized):
    _, gm = quantized
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    first = pi0_lerobot.make_batch(policy, 2, 7, "cpu")
    want = gm(**first)
    assert torch.allclose(compiled(**fxquant.mark_batch_unbacked(first)), want, atol=1e-5)
    for size in (3, 1):
        batch = pi0_lerobot.make_batch(policy, size, 8, "cpu")
        assert torch.allclose(compiled(**batch), gm(**batch), atol=1e-5)
    assert counter.frame_count == 1
