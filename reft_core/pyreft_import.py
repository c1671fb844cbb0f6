"""Import a directory written by pyreft's `ReftModel.save` (`config.json` + `intkey_*.bin`).

The `.bin` files are pickles, so they are untrusted code until proven otherwise: they are read only with
`torch.load(weights_only=True)`, which refuses any pickle that would construct arbitrary objects, and every size,
name and shape is checked before use. Intervention classes are matched by name against an allow list; nothing from
the directory is ever imported or executed.

pyreft does not save which positions an intervention was trained on, so the caller supplies them (default `l1`,
the last prompt token, as in pyreft's `make_last_position_supervised_data_module`). With two interventions per layer
(pyreft's `share_weights=False` convention of duplicating the layer list) the one saved with key suffix `#0`
edits the prefix positions and `#1` the suffix positions.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from reft_core.config import InterventionConfig, Unit
from reft_core.errors import InvalidConfigError, PyreftImportError
from reft_core.intervention import Intervention, UnitWeights
from reft_core.positions import PositionSpec

MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 256 << 20  # per intkey file; a LoReFT unit on an 8k-wide model at rank 64 is ~4 MB
ALLOWED_TYPES = {"LoreftIntervention": "loreft", "NoreftIntervention": "noreft", "DireftIntervention": "direft"}
_KEY_PATTERN = re.compile(
    r"^intkey_layer[._](?P<layer>\d+)[._]comp[._](?P<component>[a-z_]+?)[._]unit[._](?P<unit>[a-z_.]+?)"
    r"[._]nunit[._](?P<nunit>\d+)#(?P<index>\d+)\.bin$"
)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise PyreftImportError("not a pyreft save directory: config.json is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise PyreftImportError("pyreft config.json is implausibly large")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PyreftImportError(f"pyreft config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PyreftImportError("pyreft config.json must be a JSON object")
    return config


def _representation(entry: Any) -> tuple[int, str, int]:
    """(layer, component, rank) of one pyvene representation (a 14-element list, or a dict in newer versions)."""
    try:
        if isinstance(entry, dict):
            layer, component, rank = entry["layer"], entry["component"], entry["low_rank_dimension"]
        else:
            layer, component, rank = entry[0], entry[1], entry[4]
    except (KeyError, IndexError, TypeError):
        raise PyreftImportError(f"unreadable representation entry in config.json: {entry!r:.200}") from None
    if not (isinstance(layer, int) and isinstance(component, str) and isinstance(rank, int)):
        raise PyreftImportError(f"unreadable representation entry in config.json: {entry!r:.200}")
    return layer, component, rank


def _intervention_kind(config: dict[str, Any], count: int) -> str:
    raw = config.get("intervention_types")
    names = raw if isinstance(raw, list) else [raw] * count
    kinds = set()
    for name in names:
        match = re.search(r"(\w+)'?>?$", str(name))
        kind = ALLOWED_TYPES.get(match.group(1) if match else "")
        if kind is None:
            raise PyreftImportError(
                f"unsupported pyreft intervention type {str(name)[:120]!r}; supported: {sorted(ALLOWED_TYPES)}"
            )
        kinds.add(kind)
    if len(kinds) != 1:
        raise PyreftImportError(f"mixed intervention types are not supported: {sorted(kinds)}")
    return kinds.pop()


def _load_state(path: Path) -> dict[str, Tensor]:
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise PyreftImportError(f"{path.name} is larger than {MAX_WEIGHTS_BYTES >> 20} MB")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a malformed pickle raises anything (b"\x80\x02." is an IndexError)
        raise PyreftImportError(
            f"{path.name} was refused: not a plain tensor file (unsafe or corrupt pickle: {str(exc)[:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise PyreftImportError(f"{path.name} does not contain a name -> tensor mapping")
    return state


def _orthogonal_weight(state: dict[str, Tensor], prefix: str, shape: tuple[int, int]) -> Tensor:
    """Rebuild a parametrized (orthogonal) weight from its saved raw state with torch's own parametrization."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(shape))
    parametrizations.orthogonal(holder)
    sub = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
    try:
        holder.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        raise PyreftImportError(f"cannot rebuild the orthogonal rotation: {str(exc)[:200]}") from None
    return holder.weight.detach().clone()


def _unit_weights(kind: str, state: dict[str, Tensor], name: str) -> UnitWeights:
    def get(key: str) -> Tensor:
        if key not in state:
            raise PyreftImportError(f"{name} is missing tensor {key!r} (has {sorted(state)[:8]})")
        return state[key].float()

    if kind == "loreft":  # pyreft saves the materialised rotation, shape [d, r] = Rᵀ
        return UnitWeights(R=get("rotate_layer").T.contiguous(), W=get("weight"), b=get("bias"))
    if kind == "noreft":  # h + Pᵀ(W h + b − (P h + c)): fold the projection bias c into b
        proj_bias = state.get("proj_layer.bias")
        b = get("learned_source.bias") - (proj_bias.float() if proj_bias is not None else 0.0)
        return UnitWeights(R=get("proj_layer.weight"), W=get("learned_source.weight"), b=b)
    original = get("rotate_layer.parametrizations.weight.original")  # direft: default nn.Module state dict
    rotation = _orthogonal_weight(state, "rotate_layer.", tuple(original.shape))
    return UnitWeights(R=rotation.T.contiguous(), W=get("learned_source.weight"), b=get("learned_source.bias"))


def _checked_unit_weights(kind: str, state: dict[str, Tensor], name: str) -> UnitWeights:
    """`_unit_weights`, with whatever odd tensors make torch raise (wrong ranks, dtypes) reported as an import error."""
    try:
        return _unit_weights(kind, state, name)
    except PyreftImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tensors are untrusted: any failure is the save's fault
        raise PyreftImportError(f"{name} has unusable tensors: {str(exc)[:200]}") from None


def import_pyreft(directory: Path, *, positions: str = "l1") -> Intervention:
    """Convert a pyreft save directory into an `Intervention` (float32). Raises PyreftImportError on bad input."""
    directory = Path(directory)
    config = _read_config(directory)
    representations = config.get("representations")
    if not isinstance(representations, list) or not representations:
        raise PyreftImportError("pyreft config.json has no 'representations' list")
    parsed = [_representation(entry) for entry in representations]
    components = {component for _, component, _ in parsed}
    if components != {"block_output"}:
        raise PyreftImportError(f"only component 'block_output' is supported, got {sorted(components)}")
    ranks = {rank for _, _, rank in parsed}
    if len(ranks) != 1:
        raise PyreftImportError(f"interventions with different ranks are not supported: {sorted(ranks)}")
    kind = _intervention_kind(config, len(parsed))
    per_layer = Counter(layer for layer, _, _ in parsed)
    counts = set(per_layer.values())
    try:
        spec = PositionSpec.parse(positions)
    except InvalidConfigError as exc:
        raise PyreftImportError(str(exc)) from None
    if counts == {2} and not spec.two_sided:
        raise PyreftImportError(
            f"this save has two interventions per layer (pyreft share_weights=False): positions must name both a "
            f"prefix and a suffix (e.g. 'f1+l1'), got {positions!r}"
        )
    if counts not in ({1}, {2}):
        raise PyreftImportError(f"unsupported layer layout: interventions per layer {dict(per_layer)}")
    ours = InterventionConfig(
        layers=tuple(sorted(per_layer)), rank=ranks.pop(), positions=positions, type=kind,  # type: ignore[arg-type]
        share_weights=counts == {1}, dtype="float32",
    )
    files = {}
    for path in directory.iterdir():
        match = _KEY_PATTERN.match(path.name)
        if match and path.is_file():
            files[(int(match["layer"]), int(match["index"]))] = path
    units: dict[Unit, UnitWeights] = {}
    for unit in ours.units():
        index = 1 if unit.group == "suffix" else 0
        path = files.get((unit.layer, index))
        if path is None:
            raise PyreftImportError(f"missing weights file for layer {unit.layer} intervention #{index}")
        units[unit] = _checked_unit_weights(kind, _load_state(path), path.name)
    hidden_sizes = {w.R.shape[-1] for w in units.values()}
    if len(hidden_sizes) != 1:
        raise PyreftImportError(f"inconsistent hidden sizes across interventions: {sorted(hidden_sizes)}")
    try:
        return Intervention(config=ours, hidden_size=hidden_sizes.pop(), units=units)
    except Exception as exc:  # shape / NaN problems, reported in import terms
        raise PyreftImportError(f"invalid pyreft weights: {exc}") from None
