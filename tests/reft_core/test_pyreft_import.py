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


def loreft_states(config: InterventionConfig, seed: int = 0, hidden: int = HIDDEN) -> tuple[dict[str, object], object]:
    """pyreft's LoReFT state dicts (weight, bias, rotate_layer = Rᵀ) for a random intervention of `config`."""
    intervention = random_intervention(config, seed=seed, hidden=hidden)
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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyreft"


@pytest.fixture(scope="module")
def pyreft_model():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(FIXTURES / "tiny_llama", dtype=torch.float32).eval()


def prefill_last_logits(model, prompt: list[int], intervention) -> torch.Tensor:
    from reft_core.bank import InterventionBank, RowPlacement
    from reft_core.hooks import editing_layers

    bank = InterventionBank.for_interventions([intervention], num_layers=len(model.model.layers))
    plan = bank.plan([RowPlacement(slot=1, prompt_len=len(prompt))])
    with torch.no_grad(), editing_layers(model, bank.edits(plan)):
        return model(input_ids=torch.tensor([prompt])).logits[0, -1]


@pytest.mark.parametrize("name", ["loreft_l1", "loreft_f1l1_noshare"])
def test_outputs_equal_pyreft_on_its_own_saves(pyreft_model, name) -> None:
    """Artifacts written by real pyreft (tests/fixtures/pyreft/make_fixtures.py) give pyreft's tokens and logits."""
    from reft_core.generate import generate

    expected = json.loads((FIXTURES / "expected.json").read_text())
    eos = expected["eos_token_id"]
    setup = expected[name]
    intervention = import_pyreft(FIXTURES / name, positions=setup["positions"])
    steered_somewhere = False
    for case in setup["cases"]:
        prompt = case["prompt_ids"]
        # the positions we derive are the ones pyreft was given
        ours = [intervention.config.positions_for(u.group, len(prompt)) for u in intervention.config.units()]
        assert ours == case["unit_locations"]
        [tokens] = generate(pyreft_model, [prompt], [intervention], max_new_tokens=12, eos_token_id=eos)
        theirs = case["greedy_ids"]
        assert tokens == (theirs[: theirs.index(eos)] if eos in theirs else theirs)
        steered_somewhere |= theirs != case["bare_greedy_ids"]
        torch.testing.assert_close(
            prefill_last_logits(pyreft_model, prompt, intervention), torch.tensor(case["prefill_last_logits"]),
            rtol=1e-4, atol=1e-4,
        )
        [bare] = generate(pyreft_model, [prompt], [None], max_new_tokens=12, eos_token_id=eos)
        bare_theirs = case["bare_greedy_ids"]
        assert bare == (bare_theirs[: bare_theirs.index(eos)] if eos in bare_theirs else bare_theirs)
    assert steered_somewhere


def _pyreft_like(kind: str, hidden: int = HIDDEN, rank: int = 3, seed: int = 0) -> torch.nn.Module:
    """A module with the parameter layout of pyreft's DireftIntervention / NoreftIntervention."""
    torch.manual_seed(seed)
    module = torch.nn.Module()
    module.learned_source = torch.nn.Linear(hidden, rank)
    if kind == "direft":
        rotate = torch.nn.Module()
        rotate.weight = torch.nn.Parameter(torch.empty(hidden, rank))
        torch.nn.init.orthogonal_(rotate.weight)
        module.rotate_layer = torch.nn.utils.parametrizations.orthogonal(rotate)
        with torch.no_grad():  # move away from the initial point so the parametrization matters
            module.rotate_layer.parametrizations.weight.original.add_(0.3 * torch.randn(hidden, rank))
    else:
        module.proj_layer = torch.nn.Linear(hidden, rank, bias=True)
    return module


@pytest.mark.parametrize("kind", ["direft", "noreft"])
def test_direft_and_noreft_imports_compute_pyreft_formulas(tmp_path, kind) -> None:
    module = _pyreft_like(kind)
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    type_name = f"<class 'pyreft.interventions.{'Direft' if kind == 'direft' else 'Noreft'}Intervention'>"
    directory = write_pyreft_dir(tmp_path / kind, [1], 3, {key: module.state_dict()}, kind=type_name)
    imported = import_pyreft(directory)
    assert imported.config.type == kind
    [weights] = imported.units.values()
    h = torch.randn(5, HIDDEN)
    with torch.no_grad():
        source = module.learned_source(h)
        if kind == "direft":  # pyreft: h + (W h + b) @ rotate_layer.weight.T
            expected = h + source @ module.rotate_layer.weight.T
        else:  # pyreft: h + (W h + b − proj(h)) @ proj.weight
            expected = h + (source - module.proj_layer(h)) @ module.proj_layer.weight
    from reft_core.functional import direft, loreft

    ours = (direft if kind == "direft" else loreft)(h, *weights.as_tuple())
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
