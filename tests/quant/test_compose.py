"""Every quantizer runs inside the one loop with SFT and GRPO, and with AdamW and SGD-momentum."""
import pytest

from rlx.tasks import run_training
from tests.conftest import small_config

QUANTIZERS = [["quantizer=eco"], ["quantizer=eco", "quantizer.format=int", "quantizer.rounding=stochastic",
                                  "quantizer.group_size=16"],
              ["quantizer=no_master"], ["quantizer=master"], ["quantizer=qat", "quantizer.start=1"],
              ["quantizer=eqnet", "quantizer.weight_bits=[2,4]"]]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: "-".join(o.split("=")[1] for o in q[:2]))
@pytest.mark.parametrize("algo", ["sft", "grpo"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_quantizer_composes(quantizer, algo, optimizer, tmp_path):
    summary = run_training(small_config(*quantizer, f"algo={algo}", f"optimizer={optimizer}", "trainer.save_every=1"),
                           tmp_path)
    assert summary["steps"] == 2
    assert summary["memory/held_MB"] > 0
