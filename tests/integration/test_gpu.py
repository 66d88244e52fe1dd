"""GPU-only paths (skipped without a CUDA device): DALI mixed decode, bf16 + channels_last training
with a pruning event, pruned model on the GPU equal to the gated one."""

import pytest
import torch

from system.models.resnet import build_model, set_gate_mode
from system.models.spec import dense_spec
from system.pruning.surgery import PrunePlan, apply_plan, zero_gates_for
from tests.methods_util import STRONG, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_dali_mixed_decode_matches_the_cpu_pipeline_labels():
    from pipelines.config import DataConfig
    from pipelines.loaders import build_loader

    cfg = DataConfig(loader="dali", batch_size=50, train_size=28, val_resize=28, val_crop=28, workers=2)
    gpu = build_loader(cfg, "val", 0, 1, 0, 0, device="cuda")
    cpu = build_loader(cfg, "val", 0, 1, 0, 0, device="cpu")
    g_labels = torch.cat([y.cpu() for _, y in gpu])
    c_labels = torch.cat([y for _, y in cpu])
    assert torch.equal(g_labels, c_labels)
    x, _ = next(iter(gpu))
    assert x.is_cuda and x.shape[1:] == (3, 28, 28)


def test_bf16_channels_last_training_prunes_on_gpu(tmp_path):
    from system.trainer import Trainer

    cfg = tiny_config(tmp_path, "train.device=cuda", "train.precision=bf16", "train.channels_last=true",
                      "train.max_steps=12", *STRONG["variational"])
    summary = Trainer(cfg).run()
    assert summary["device"].startswith("cuda") and summary["prune_events"] >= 1
    assert summary["macs"] < summary["macs_dense"]


def test_pruned_equals_gated_on_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare in true fp32
    torch.manual_seed(0)
    model = build_model(dense_spec("resnet50", input_size=64, num_classes=10)).cuda().eval()
    plan = PrunePlan(units={"layer1.0.gate1": (0, 1, 2)}, blocks=("layer3.2",))
    small, _, _ = apply_plan(model, plan)
    zero_gates_for(model, plan)
    set_gate_mode(model, unit="deterministic", layer="deterministic")
    set_gate_mode(small, unit="deterministic", layer="deterministic")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        a, b = small(x), model(x)
    assert ((a - b).norm() / b.norm()).item() < 1e-4
