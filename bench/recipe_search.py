"""How the default training recipe was chosen: candidate recipes x personas of different kinds, on the embedded model.

    .venv/bin/python bench/recipe_search.py [--candidates default,l1,...] [--personas emoji,shouting,...]
                                            [--out recipe_search.jsonl]

Each candidate trains every persona from its 10 examples (seed 42), then answers 20 held-out prompts that are in no
training set (`bench/personas/heldout_prompts.txt`) greedily, 48 new tokens, chat template. Adherence is the share of
answers that a persona-specific check accepts (emoji only; shouted in capitals; French; a bullet list). The bare
model's adherence is printed too, to show that the checks do not pass ordinary answers. Results are appended to
`--out` as JSON lines as they come (a run can be stopped and resumed: finished pairs are skipped), then printed as a
markdown table: adherence per persona, mean, and training wall time (seconds; compare within one run only).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reft_core import recipe  # noqa: E402
from reft_core.base_model import load_base_model  # noqa: E402
from reft_core.config import InterventionConfig  # noqa: E402
from reft_core.examples import Example, encode_prompt, tokenize_examples  # noqa: E402
from reft_core.generate import generate  # noqa: E402
from reft_core.trainer import TrainingConfig, train_intervention  # noqa: E402
from tests.e2e.emoji import DATA as EMOJI_DATA  # noqa: E402
from tests.e2e.emoji import is_emoji_only  # noqa: E402

PERSONAS_DIR = ROOT / "bench" / "personas"
HELDOUT = [p for p in (PERSONAS_DIR / "heldout_prompts.txt").read_text().splitlines() if p.strip()]
_FRENCH = set("le la les de des du un une est et en pour que qui dans pas sur avec au aux ce vous je il elle nous "
              "sont très plus mais ou son sa ses leur cette être faire peut".split())
_ENGLISH = set("the is and of to a in for that you it are with on this be what can your have".split())


def is_shouting(text: str) -> bool:
    letters = [c for c in text if c.isalpha() and c.lower() != c.upper()]
    return len(letters) >= 8 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower().replace("'", " ").replace("’", " "))
    french, english = sum(w in _FRENCH for w in words), sum(w in _ENGLISH for w in words)
    return french >= 2 and french > 2 * english


def is_bullet_list(text: str) -> bool:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    bullets = [line for line in lines if line.startswith(("- ", "* ", "• "))]
    return len(lines) >= 2 and len(bullets) >= 0.8 * len(lines) and lines[0] in bullets


@dataclass(frozen=True)
class Persona:
    kind: str
    data: Path
    check: Callable[[str], bool]


PERSONAS = {
    "emoji": Persona("format: emoji only", EMOJI_DATA, is_emoji_only),
    "shouting": Persona("tone: all capitals", PERSONAS_DIR / "shouting.jsonl", is_shouting),
    "french": Persona("language: French", PERSONAS_DIR / "french.jsonl", is_french),
    "bullets": Persona("format: bullet list", PERSONAS_DIR / "bullets.jsonl", is_bullet_list),
}


@dataclass(frozen=True)
class Candidate:
    positions: str = recipe.POSITIONS
    rank: int = recipe.RANK
    depth_fractions: tuple[float, ...] = recipe.DEPTH_FRACTIONS
    epochs: int | Literal["auto"] = recipe.EPOCHS
    learning_rate: float = recipe.LEARNING_RATE
    validation_split: float | None = None  # hold out this share of the examples (as the server's validation_split)

    def layers(self, num_layers: int) -> list[int]:
        return sorted({min(num_layers - 1, round(f * num_layers)) for f in self.depth_fractions})


CANDIDATES = {
    "default": Candidate(),
    "l1": Candidate(positions="l1"),
    "f2+l2": Candidate(positions="f2+l2"),
    "rank4": Candidate(rank=4),
    "10ep-lr8e-3": Candidate(epochs=10, learning_rate=8e-3),
    "6-layers": Candidate(depth_fractions=tuple(i / 30 for i in (4, 8, 12, 16, 20, 24))),
    "1-layer-mid": Candidate(depth_fractions=(15 / 30,)),
    "auto": Candidate(epochs="auto"),
    "l1-auto": Candidate(positions="l1", epochs="auto"),
    "auto-val20": Candidate(epochs="auto", validation_split=0.2),
    "l1-10ep-lr8e-3": Candidate(positions="l1", epochs=10, learning_rate=8e-3),
}


def examples_of(path: Path) -> list[Example]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(row["prompt"], row["completion"]) for row in rows]


def answers(base, interventions: list) -> list[str]:  # noqa: ANN001
    tokenizer = base.tokenizer
    prompts = [encode_prompt(tokenizer, p, chat_template=True) for p in HELDOUT]
    outputs = generate(base.model, prompts, interventions, max_new_tokens=48, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]


def run_pair(base, name: str, candidate: Candidate, persona_name: str) -> dict:  # noqa: ANN001
    persona = PERSONAS[persona_name]
    config = InterventionConfig(layers=candidate.layers(base.num_layers), rank=candidate.rank,
                                positions=candidate.positions, share_weights=recipe.SHARE_WEIGHTS)
    training = TrainingConfig(epochs=candidate.epochs, learning_rate=candidate.learning_rate)
    examples = tokenize_examples(base.tokenizer, examples_of(persona.data), chat_template=True)
    validation = []
    if candidate.validation_split is not None:  # the examples the server would hold out for this seed
        held = set(random.Random(recipe.SEED).sample(range(len(examples)),
                                                     max(1, round(len(examples) * candidate.validation_split))))
        validation = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    started = time.perf_counter()
    result = train_intervention(base.model, config, examples, training, validation=validation)
    wall = time.perf_counter() - started
    texts = answers(base, [result.intervention] * len(HELDOUT))
    hits = [persona.check(t) for t in texts]
    return {"candidate": name, "persona": persona_name, "adherence": sum(hits) / len(hits), "wall_s": round(wall, 1),
            "final_loss": round(result.losses[-1], 4), "steps": len(result.losses), "misses": [t for t, ok in zip(texts, hits) if not ok][:3]}


def table(rows: list[dict], personas: list[str], base_rates: dict[str, float]) -> str:
    header = "| candidate | " + " | ".join(personas) + " | mean | train wall (s, mean) |"
    lines = [header, "|" + "---|" * (len(personas) + 3)]
    lines.append("| bare model | " + " | ".join(f"{base_rates.get(p, float('nan')):.0%}" for p in personas)
                 + " | | |")
    by_candidate: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_candidate.setdefault(row["candidate"], {})[row["persona"]] = row
    for name, got in by_candidate.items():
        cells = [f"{got[p]['adherence']:.0%}" if p in got else "-" for p in personas]
        done = [got[p] for p in personas if p in got]
        mean = sum(r["adherence"] for r in done) / len(done)
        wall = sum(r["wall_s"] for r in done) / len(done)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.0%} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--personas", default=",".join(PERSONAS))
    parser.add_argument("--out", type=Path, default=Path("recipe_search.jsonl"))
    args = parser.parse_args()
    candidates, personas = args.candidates.split(","), args.personas.split(",")
    base = load_base_model()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    base_rows = [r for r in rows if r.get("candidate") == "bare model"]
    if not base_rows:
        texts = answers(base, [None] * len(HELDOUT))
        base_rows = [{"candidate": "bare model", "persona": p,
                      "adherence": sum(PERSONAS[p].check(t) for t in texts) / len(texts)} for p in PERSONAS]
        with args.out.open("a") as out:
            out.writelines(json.dumps(r) + "\n" for r in base_rows)
    base_rates = {r["persona"]: r["adherence"] for r in base_rows}
    done = {(r["candidate"], r["persona"]) for r in rows}
    for name in candidates:
        for persona_name in personas:
            if (name, persona_name) in done:
                continue
            row = run_pair(base, name, CANDIDATES[name], persona_name)
            print(json.dumps(row, ensure_ascii=False), flush=True)
            with args.out.open("a") as out:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows.append(row)
    trained = [r for r in rows if r["candidate"] != "bare model" and r["candidate"] in candidates]
    print(table(trained, personas, base_rates))


if __name__ == "__main__":
    main()
