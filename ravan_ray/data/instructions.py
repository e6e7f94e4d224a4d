"""A labelled text dataset as instruction-tuning data in the Stanford Alpaca layout, so a causal LM learns
the classification by generating the class's name (exact match of the generation is then the accuracy).

Each example becomes ``instruction`` (one fixed instruction for the whole dataset), ``input`` (the text)
and ``output`` (the name of its class: ``card_arrival``, ``rec.sport.hockey``), and keeps ``label`` (the
class id) so ``data.partition.label_field=label`` can still split the clients by class.

Used by ``data.name=banking77-instruct`` (the shipped Banking77) and by ``data.as_instructions=true`` on
any labelled source with ``text`` and ``label`` columns (the layout of the shipped datasets and of
``shared/data/*``, e.g. 20 Newsgroups from a local path), with ``data.instruction`` or the generic
instruction below.

The instruction does not list the classes: 77 intent names would be ~500 prompt tokens per example, more
than the query itself many times over. The clients learn the names from their training responses, which
is what the federated fine-tuning is measured on.
"""

from __future__ import annotations

from typing import Any

from ravan_ray.data.errors import DataError
from ravan_ray.data.splits import Splits, encode_labels

#: Datasets shipped inside the package, as instruction data: name -> the shipped dataset it is made of.
BUILTIN_INSTRUCTION_DATASETS = {"banking77-instruct": "banking77"}

TEXT_FIELD, LABEL_FIELD = "text", "label"
INSTRUCTION_FIELDS = ("instruction", "input", "output")
GENERIC_INSTRUCTION = "Classify the text. Answer with the name of its category only."
BANKING77_INSTRUCTION = ("Which intent does this customer query to a bank express? "
                         "Answer with the intent's name only.")


def default_instruction(data_config: Any) -> str:
    """Banking77's own instruction for the shipped Banking77, the generic one for every other source."""
    shipped = data_config.path is None and BUILTIN_INSTRUCTION_DATASETS.get(data_config.name, data_config.name)
    return BANKING77_INSTRUCTION if shipped == "banking77" else GENERIC_INSTRUCTION


def classification_as_instructions(splits: Splits, instruction: str = GENERIC_INSTRUCTION) -> Splits:
    """``splits`` (train, test and validation where present) in the Alpaca layout described in the module
    docstring. Class names come from the source's label names (``label_names.json``, a ``ClassLabel``) for
    integer labels, else are the label values themselves; all splits are encoded together, so a class has
    one id everywhere."""
    import datasets

    if not instruction.strip():
        raise DataError("data.instruction is empty: give the instruction every example starts with")
    present = [name for name in ("train", "test", "validation") if splits.split(name) is not None]
    splits.require({"text_field": TEXT_FIELD, "label_field": LABEL_FIELD}, tuple(present))
    raw = {name: splits.column(name, LABEL_FIELD) for name in present}
    ids, names = encode_labels([v for name in present for v in raw[name]], LABEL_FIELD, splits.where,
                               splits.label_names)
    converted: dict[str, Any] = {}
    start = 0
    for name in present:
        split_ids = ids[start:start + len(raw[name])]
        start += len(raw[name])
        texts = ["" if t is None else str(t) for t in splits.column(name, TEXT_FIELD)]
        converted[name] = datasets.Dataset.from_dict({
            "instruction": [instruction] * len(texts), "input": texts,
            "output": [names[i] for i in split_ids], "label": split_ids.tolist()})
    return Splits(converted["train"], converted["test"], f"{splits.where} as instructions", names,
                  converted.get("validation"))
