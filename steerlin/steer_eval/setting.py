"""What a task's evaluation is set up with: its judge, its label names and readout words, the
prompting baseline's instructions (`EvalSetting`, `SETTINGS`), and the shipped neutral stems
the schedules are calibrated on and evaluated with (`neutral_stems`, `instructed`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from ..data.splits import chat_prompts


@dataclass(frozen=True)
class EvalSetting:
    """One task's set-up for `steer_eval`."""

    name: str
    judge: str  # "vader" or "profanity"
    plus: str  # name of label 1
    minus: str  # name of label 0
    label_words: tuple[str, str] = (" positive", " negative")  # logit readout (+, −)
    #: the prompting baseline's instruction prefixes (+, −): plain text for a base model
    instructions: tuple[str, str] = (
        "The following text is very positive, happy and enthusiastic.\n\n",
        "The following text is very negative, unhappy and bitter.\n\n",
    )


#: the evaluation's tasks -> their names in the data registry (`steerlin.load_task`)
TASKS = {"sst2": "sst2", "hate": "tweet_eval_hate"}
SETTINGS = {
    "sst2": EvalSetting("sst2", "vader", "positive", "negative"),
    "hate": EvalSetting(
        "hate",
        "profanity",
        "hateful",
        "not hateful",
        (" hate", " love"),
        (
            "The following text is hateful, offensive and insulting.\n\n",
            "The following text is kind, respectful and polite.\n\n",
        ),
    ),
}


def neutral_stems() -> dict[str, list[str]]:
    """The shipped neutral prompt stems: {"calibration": 12, "eval": 36 (3 seeds of 12),
    "extra": 144}. "calibration" calibrates schedules; "eval" is steer-eval's held-out set;
    "extra" are further held-out stems, distinct from both, that the per-layer ground truth
    (`steerlin.ground_truth`) judges together with "eval" (180 stems)."""
    ref = resources.files("steerlin").joinpath("data", "neutral_stems.txt")
    out: dict[str, list[str]] = {"calibration": [], "eval": [], "extra": []}
    key = None
    for line in ref.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s.startswith("# ---"):
            key = next((k for k in ("calibration", "extra") if k in s), "eval")
            continue
        if not s or s.startswith("#") or key is None:
            continue
        out[key].append(s)
    return out


def instructed(model, instruction: str, stems: Sequence[str], *, chat: bool = False) -> list[str]:
    """The stems with the prompting baseline's instruction: a plain prefix (base models), or
    with `chat` the instruction as one user turn of the chat template and each stem opening the
    assistant's answer (`steerlin.data.chat_prompts`, its BOS rule included)."""
    if not chat:
        return [instruction + p for p in stems]
    head = chat_prompts([instruction.strip()], model)[0]
    return [head + p for p in stems]
