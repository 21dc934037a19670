"""Every quantizer runs inside the one loop with SFT and GRPO, and with AdamW and SGD-momentum."""
import pytest

from rlx.tasks import run_training
from tests.support import small_config

QUANTIZERS = [["quantizer=eco"], ["quantizer=eco", "quantizer.format=int", "quantizer.rounding=stochastic",
                                  "quantizer.group_size=16"],
              ["quantizer=no_master"], ["quantizer=master"], ["quantizer=qat", "quantizer.start=1"],
              ["quantizer=eqnet", "quantizer.weight_bits=[2,4]"]]


ALGOS, OPTIMIZERS = ["sft", "grpo"], ["adamw", "sgd"]
# the fast suite trains each quantizer once, with every algorithm and every optimizer (all four of their pairs)
# among the six; the rest of the cross product is slow (`make test-slow`)
COVERING = {(0, "sft", "adamw"), (1, "grpo", "sgd"), (2, "sft", "sgd"), (3, "grpo", "adamw"), (4, "sft", "adamw"),
            (5, "grpo", "sgd")}


def quantizer_id(quantizer: list[str]) -> str:
    return "-".join(o.split("=")[1] for o in quantizer[:2])


@pytest.mark.parametrize("quantizer, algo, optimizer", [
    pytest.param(quantizer, algo, optimizer, id=f"{optimizer}-{algo}-{quantizer_id(quantizer)}",
                 marks=() if (i, algo, optimizer) in COVERING else pytest.mark.slow)
    for optimizer in OPTIMIZERS for algo in ALGOS for i, quantizer in enumerate(QUANTIZERS)])
def test_quantizer_composes(quantizer, algo, optimizer, tmp_path):
    summary = run_training(small_config(*quantizer, f"algo={algo}", f"optimizer={optimizer}", "trainer.save_every=1"),
                           tmp_path)
    assert summary["steps"] == 2
    assert summary["memory/held_MB"] > 0
