"""Export without gates, load back, TorchScript; launch.inspect on names, specs and runs."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from launch.inspect import main as inspect_main
from system.export import deploy_model, export_model, load_exported
from system.models.resnet import build_model, gates_of, set_gate_mode
from system.models.spec import SpecError, dense_spec
from system.pruning.complexity import count
from system.pruning.surgery import apply_plan, plan_from_gates


def _trained_like(seed=0):
    torch.manual_seed(seed)
    model = build_model(dense_spec("resnet20", input_size=16))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        g = gates_of(model)
        g["layer1.0.gate1"].theta[:5] = 0.1
        g["layer2.1.layer_gate"].theta.fill_(0.2)
        g["layer3.0.gate1"].theta[10:] = 0.3
        g["layer3.2.gate1"].theta[:] = torch.linspace(0.6, 1.0, 64)
    return model.eval()


@pytest.mark.parametrize("mode", ["deterministic", "mean"])
def test_export_folds_gates_and_loads_back(tmp_path, mode):
    model = _trained_like()
    set_gate_mode(model, unit=mode, layer=mode)
    plain = deploy_model(model, gate_eval=mode)
    assert not any(n.endswith("theta") for n, _ in plain.named_parameters())
    x = torch.randn(3, 3, 16, 16)
    # the reference: the gated model with what the plan cuts zeroed, evaluated in `mode`
    ref = build_model(model.spec())
    ref.load_state_dict(model.state_dict())
    set_gate_mode(ref, unit=mode, layer=mode)
    with torch.no_grad():
        for _n, g in gates_of(ref).items():
            g.theta[g.theta <= 0.5] = 0.0
        expect = ref.eval()(x)
        torch.testing.assert_close(plain(x), expect, rtol=1e-5, atol=1e-5)
    spec = export_model(model, tmp_path / "final", gate_eval=mode)
    assert spec.get_block("layer2.1").removed and spec.get_block("layer1.0").inner == (11,)
    back = load_exported(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(back(x), plain(x))
    exported = torch.export.export(back, (x,)).module()  # a graph export of the pruned network runs
    with torch.no_grad():
        torch.testing.assert_close(exported(x), plain(x))
    with warnings.catch_warnings():  # TorchScript still runs; torch marks it deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(back, x)
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(x), plain(x))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_load_exported_refuses_mismatched_weights(tmp_path):
    export_model(_trained_like(), tmp_path / "a")
    spec = json.loads((tmp_path / "a" / "spec.json").read_text())
    spec["blocks"][0][0]["inner"] = [3]
    (tmp_path / "a" / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match="does not match"):
        load_exported(tmp_path / "a")


def test_inspect_name_json(capsys):
    assert inspect_main(["resnet50", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["macs"] == 4089184256 and rec["blocks_total"] == 16 and rec["blocks_kept"] == 16


def test_inspect_spec_and_run_dir(tmp_path, capsys):
    model = _trained_like()
    _small, spec, _ = apply_plan(model, plan_from_gates(model))
    (tmp_path / "s.json").write_text(spec.to_json())
    assert inspect_main([str(tmp_path / "s.json"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["macs"], rec["params"]) == count(spec)
    assert rec["blocks_kept"] == 8
    export_model(model, tmp_path / "run" / "final")
    assert inspect_main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "blocks kept 8/9" in out and "MACs" in out


def test_inspect_cli_unknown_target():
    r = subprocess.run([sys.executable, "-m", "launch.inspect", "resnet7"], capture_output=True, text=True)
    assert r.returncode == 2 and "resnet7" in r.stderr
