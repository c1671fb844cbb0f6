"""Examples files (JSONL), parsed in one place for every route that takes them: `POST /v1/trainings/upload`, `POST
/v1/files` (validated on upload) and `POST /v1/fine_tuning/jobs` (the stored file, parsed again under today's limits).

One example per line, `{prompt, completion}` or `{messages}` (as `ExampleIn` validates them); blank lines are
skipped. Every refusal is a 400 naming the line as editors number them, so a user can go straight to it.
"""

from __future__ import annotations

from pydantic import ValidationError

from server.errors import APIError
from server.training_request import ExampleIn


def parse_examples(payload: bytes, max_examples: int, *, source: str = "the examples file",
                   param: str = "file") -> list[ExampleIn]:
    """Examples from JSONL; `source` names the file in messages, `param` is the error's parameter."""
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise APIError(400, f"{source} is not UTF-8 text", param=param, code="invalid_encoding") from None
    examples: list[ExampleIn] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(examples) == max_examples:
            raise APIError(400, f"{source} has more than {max_examples} examples; the limit is {max_examples}",
                           param=param, code="too_many_examples")
        try:
            examples.append(ExampleIn.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            reason = f"{where}: {first['msg']}" if where else first["msg"]
            raise APIError(400, f"line {number} of {source}: {reason}", param=param, code="invalid_example") from None
    if not examples:
        raise APIError(400, f"{source} has no examples", param=param, code="empty_file")
    return examples
