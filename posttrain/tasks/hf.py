"""Problems from a Hugging Face `datasets` dataset (hub name, `save_to_disk` folder, or files).

    posttrain problems "hf:openai/gsm8k?config=main&split=test&answer_type=math" --out p.jsonl
    posttrain problems "hf:./saved?split=test&question=prompt&answer_type=exact" --out p.jsonl
    posttrain problems "hf:json?data_files=local.json&answer_type=math" --out p.jsonl

Options: split (default train), config, data_files, and the field mapping of `jsonl:` (question,
answer, answer_type, id, category, choices; each defaults to the field of the same name, and
answer_type may name a type literally). `datasets` is the optional extra `hf`
(pip install 'posttrain[hf]'); it is imported only here. Rows are named `NAME[SPLIT]:ROW` in
errors (ROW counts from 1); ids default to `NAME-SPLIT-ROW`.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.records import DataError, Problem
from posttrain.tasks.formats import MAPPED_FIELDS, _UniqueIds, field_mapping, problem_from_row
from posttrain.tasks.spec import Spec, SpecError


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SpecError(
            "hf:", "the hf: source needs the package 'datasets' (pip install 'posttrain[hf]')"
        ) from None
    return datasets


def open_split(spec: Spec):
    """The requested split as a `datasets.Dataset`."""
    datasets = _datasets()
    split, config = spec.options.get("split", "train"), spec.options.get("config")
    folder = Path(spec.body)
    try:
        if folder.is_dir() and any(
            (folder / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            data = datasets.load_from_disk(str(folder))
        else:
            kwargs = (
                {"data_files": spec.options["data_files"]} if "data_files" in spec.options else {}
            )
            data = datasets.load_dataset(spec.body, config, **kwargs)
    except Exception as e:  # datasets raises many kinds; the message is what the user needs
        raise SpecError(spec.text, f"cannot open the dataset: {type(e).__name__}: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise SpecError(spec.text, f"no split {split!r}; the dataset has {', '.join(data)}")
        data = data[split]
    return data


def load_hf(spec: Spec, skipped: dict, limit: int | None = None) -> list[Problem]:
    """Rows mapped like `jsonl:`; `limit` is applied before conversion (datasets can be large)."""
    spec.check_options({"split", "config", "data_files", *MAPPED_FIELDS})
    data = open_split(spec)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    split = spec.options.get("split", "train")
    files = spec.options.get("data_files")  # e.g. hf:json?data_files=x.json: name rows by file
    name = Path(files).stem if files else Path(spec.body).name or spec.body
    where, mapping = f"{files or spec.body}[{split}]", field_mapping(spec)
    if mapping["question"] not in data.column_names:  # say so once, not on row 1
        raise DataError(
            where,
            None,
            f"no such column; columns: {', '.join(data.column_names)}",
            field=mapping["question"],
        )
    ids, problems = _UniqueIds(where), []
    for i, row in enumerate(data, start=1):
        p = problem_from_row(row, mapping, where, i, f"{name}-{split}-{i}", source=f"hf:{name}")
        ids.add(p.id, i, field=mapping["id"])
        problems.append(p)
    if not problems:
        raise DataError(where, None, "empty split: no rows")
    return problems
