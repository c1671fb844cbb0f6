"""pyreft import: safe loading of pickled weights, layout rules, and parity with pyreft's own outputs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from reft_core.config import InterventionConfig
from reft_core.errors import PyreftImportError
from reft_core.pyreft_import import import_pyreft

from .conftest import HIDDEN, random_intervention

LORE = "<class 'pyreft.interventions.LoreftIntervention'>"


def write_pyreft_dir(directory: Path, layers: list[int], rank: int, states: dict[str, object], kind: str = LORE) -> Path:
    """A directory shaped like pyreft's `ReftModel.save` output (config.json + intkey_*.bin)."""
    directory.mkdir(parents=True, exist_ok=True)
    representations = [[layer, "block_output", "pos", 1, rank, None, None, None, None, None, None, None, None, None] for layer in layers]
    seen: dict[int, int] = {}
    keys = []
    for layer in layers:
        keys.append(f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{seen.get(layer, 0)}")
        seen[layer] = seen.get(layer, 0) + 1
    config = {"representations": representations, "intervention_types": [kind] * len(layers), "sorted_keys": keys}
    (directory / "config.json").write_text(json.dumps(config))
    for key in keys:
        state = states[key]
        path = directory / f"intkey_{key}.bin"
        if isinstance(state, bytes):
            path.write_bytes(state)
        else:
            torch.save(state, path)
    return directory


def loreft_states(config: InterventionConfig, seed: int = 0) -> tuple[dict[str, object], object]:
    """pyreft's LoReFT state dicts (weight, bias, rotate_layer = Rᵀ) for a random intervention of `config`."""
    intervention = random_intervention(config, seed=seed)
    states = {}
    for unit, weights in intervention.units.items():
        index = 1 if unit.group == "suffix" else 0
        key = f"layer_{unit.layer}_comp_block_output_unit_pos_nunit_1#{index}"
        states[key] = {"weight": weights.W, "bias": weights.b, "rotate_layer": weights.R.T.contiguous()}
    return states, intervention


@pytest.mark.parametrize(
    "config",
    [
        InterventionConfig(layers=(2,), rank=4, positions="l1", share_weights=True),
        InterventionConfig(layers=(1, 3), rank=2, positions="f1+l1", share_weights=False),
    ],
)
def test_import_maps_weights_and_units(tmp_path, config) -> None:
    states, expected = loreft_states(config)
    layers = [u.layer for u in config.units()]
    imported = import_pyreft(write_pyreft_dir(tmp_path / "save", layers, config.rank, states), positions=config.positions)
    assert imported.config == config and imported.hidden_size == HIDDEN
    for unit, weights in expected.units.items():
        for ours, theirs in zip(imported.units[unit].as_tuple(), weights.as_tuple()):
            assert torch.equal(ours, theirs)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_not_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker  # type: ignore[attr-defined]
    evil = pickle.dumps({"weight": payload}, protocol=2)
    import io, zipfile  # torch.save's zip container around a hostile data.pkl

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", evil)
        archive.writestr("archive/version", "3\n")
    key = "layer_2_comp_block_output_unit_pos_nunit_1#0"
    for blob in (evil, buffer.getvalue()):
        directory = write_pyreft_dir(tmp_path / f"evil{len(blob)}", [2], 4, {key: blob})
        with pytest.raises(PyreftImportError, match="refused"):
            import_pyreft(directory)
    assert not marker.exists()


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"representations": []})), "representations"),
        (lambda d: _edit_config(d, lambda c: c.update(intervention_types=["<class 'evil.Thing'>"])), "unsupported pyreft intervention type"),
        (lambda d: _edit_config(d, lambda c: c["representations"][0].__setitem__(1, "mlp_output")), "block_output"),
        (lambda d: next(d.glob("intkey_*")).unlink(), "missing weights file"),
        (lambda d: torch.save({"weight": torch.zeros(4, 64)}, next(d.glob("intkey_*"))), "missing tensor 'rotate_layer'"),
        (lambda d: torch.save({"weight": torch.zeros(4, 64), "bias": torch.full((4,), float("nan")), "rotate_layer": torch.zeros(64, 4)}, next(d.glob("intkey_*"))), "NaN"),
        (lambda d: torch.save({"weight": torch.zeros(3, 64), "bias": torch.zeros(4), "rotate_layer": torch.zeros(64, 4)}, next(d.glob("intkey_*"))), "shape"),
        (lambda d: next(d.glob("intkey_*")).write_bytes(b"garbage"), "refused"),
    ],
)
def test_malformed_saves_are_refused(tmp_path, mutate, fragment) -> None:
    config = InterventionConfig(layers=(2,), rank=4, positions="l1")
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp_path / "save", [2], 4, states)
    mutate(directory)
    with pytest.raises(PyreftImportError) as info:
        import_pyreft(directory)
    assert fragment in str(info.value)


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_two_interventions_per_layer_need_two_sided_positions(tmp_path) -> None:
    config = InterventionConfig(layers=(1,), rank=2, positions="f1+l1", share_weights=False)
    states, _ = loreft_states(config)
    directory = write_pyreft_dir(tmp_path / "save", [1, 1], 2, states)
    with pytest.raises(PyreftImportError, match="prefix and a suffix"):
        import_pyreft(directory, positions="l1")
    assert import_pyreft(directory, positions="f1+l1").config == config
