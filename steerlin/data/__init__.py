"""Labelled binary tasks: loading (Hugging Face or local files), dedupe, balanced seeded splits.

A task is a binary concept: label 1 is the concept's positive pole (positive sentiment, ironic,
hateful, toxic ...), label 0 its opposite. `load_task` reads one data split of a registered
task, either through `datasets.load_dataset` or, with `data_dir=`, from a local copy in the
original file format (SST-2 TSV, TweetEval text files). `Task.split` then draws three balanced,
pairwise-disjoint sets of prompts per class -- concept (fits the direction), operating (where
gains are measured) and eval -- deterministically from a seed, and applies the prompt template.

Nothing here downloads anything unless `load_task` is called without `data_dir`, and nothing
assumes any particular local folder exists. `load_demo_task` reads a small SST-2 sample shipped
inside the package (see `steerlin/data/README.md` for its source and licence).

Modules: `registry` (TaskSpec, TASKS, get_task_spec), `readers` (local and Hugging Face
readers, load_task), `splits` (LabelledPrompts, Splits, Task, dedupe, the common-suffix
warning), `demo` (the shipped sample and the tooling that built it).
"""

from __future__ import annotations

from .demo import DEMO_FILE, load_demo_task, select_demo_rows, write_demo_rows
from .readers import load_task, read_sst2_tsv, read_tweeteval
from .registry import ALIASES, LOCAL_FORMATS, SPLIT_ALIASES, TASKS, TaskSpec, get_task_spec
from .splits import LabelledPrompts, Splits, Task, chat_prompts, dedupe, warn_if_common_suffix

__all__ = [
    "chat_prompts",
    "ALIASES",
    "DEMO_FILE",
    "LOCAL_FORMATS",
    "SPLIT_ALIASES",
    "TASKS",
    "LabelledPrompts",
    "Splits",
    "Task",
    "TaskSpec",
    "dedupe",
    "get_task_spec",
    "load_demo_task",
    "load_task",
    "read_sst2_tsv",
    "read_tweeteval",
    "select_demo_rows",
    "warn_if_common_suffix",
    "write_demo_rows",
]
