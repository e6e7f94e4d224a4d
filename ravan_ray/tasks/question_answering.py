"""Extractive question answering in SQuAD format (the paper's MRQA): ``AutoModelForQuestionAnswering`` (a
new span head: start and end logits per token), exact match and F1 with SQuAD's answer normalisation.

Fields: ``data.question_field``, ``data.context_field`` and ``data.answers_field``, whose values are
SQuAD's ``{"text": [...], "answer_start": [...]}``. MRQA's ``detected_answers``
(``{"text": [...], "char_spans": [{"start": [...], "end": [...]}, ...]}``) is read as well, so
``mrqa-workshop/mrqa`` runs with ``data.answers_field: detected_answers``.

Long contexts, as in transformers' run_qa.py: the question and a window of the context make one row of
``data.max_length`` tokens; a context that does not fit is cut into windows that overlap by
``data.doc_stride`` tokens (default max_length // 4). A training window is labelled with the first
answer's start and end tokens, or with the first token (BERT's [CLS]) where the answer is not inside the
window. The windows of one example stay with one client (the partition splits examples).

Evaluation: every window's start / end logits; per example, the best-scoring span over all its windows
(start + end logit, among the 20 best starts and ends of each window, end >= start, at most
``data.max_answer_length`` tokens, inside the context) is the prediction. ``test_exact_match`` and
``test_f1`` are the means over test examples of the best score against any gold answer, both on
normalised text (lower case, no punctuation, no articles, single spaces), as SQuAD v1.1's official
evaluation script computes them; examples without a gold answer are left out (SQuAD v1 semantics: every
question has an answer in its context). Scores are fractions (0-1), like test_accuracy. ``test_loss`` is
the model's own span loss (mean of start and end cross-entropy) over the test windows.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ravan_ray.config import Options
from ravan_ray.data import DataError, Splits, as_texts, check_vocabulary
from ravan_ray.models import load_tokenizer
from ravan_ray.tasks.base import Arrays, Task, TaskData, batches, mean_of_row_means, object_array

N_BEST = 20  # candidate starts and ends per window (run_qa.py's default)
NOT_CONTEXT = -1  # offset of a token that is not part of the context (question, special, padding)


class QuestionAnsweringOptions(Options):
    question_field: str = "question"
    context_field: str = "context"
    answers_field: str = "answers"
    doc_stride: Optional[int] = Field(None, ge=1)  # overlap of a long context's windows; None: max_length // 4
    max_answer_length: int = Field(30, ge=1)  # in tokens


class QuestionAnswering(Task):
    name = "question_answering"
    auto_class = "AutoModelForQuestionAnswering"
    options_model = QuestionAnsweringOptions
    new_head = True
    metrics = {"test_exact_match": "max", "test_f1": "max", "test_loss": "min"}
    primary_metric = "test_f1"
    input_keys = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")

    def row_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                   widths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per window, the mean of the start and end positions' cross-entropies (transformers' QA loss before its
        mean over windows). The softmax runs over every position of the batch, padding included, as it does in
        training alone; in a cohort, positions past the width of a window's own client batch are left out, so each
        client's loss is the one it computes alone."""
        out = model(**{k: v for k, v in inputs.items() if k not in ("start_positions", "end_positions")})
        width = out.start_logits.shape[1]
        losses = []
        for logits, key in ((out.start_logits, "start_positions"), (out.end_logits, "end_positions")):
            logits = logits.float()
            if widths is not None:
                outside = torch.arange(width, device=logits.device)[None, :] >= widths.to(logits.device)[:, None]
                logits = logits.masked_fill(outside, torch.finfo(logits.dtype).min)
            losses.append(torch.nn.functional.cross_entropy(logits, inputs[key].clamp(0, width), ignore_index=width,
                                                            reduction="none"))
        per_row = (losses[0] + losses[1]) / 2
        return per_row, torch.ones_like(per_row)

    def example_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Under DP-SGD: the mean over windows of each window's span loss with its softmax over its own positions
        only (in the plain loss it runs over the batch's width, so a window's gradient would depend on how long
        the other windows of its batch are). DP-SGD sums an example's windows' gradients
        (ravan_ray/privacy/dp_sgd.py)."""
        own_widths = inputs["attention_mask"].sum(1)
        return mean_of_row_means(self.row_losses(model, inputs, own_widths))

    def prepare(self) -> TaskData:
        d = self.options
        splits = self.load_splits()
        splits.require({"question_field": d.question_field, "context_field": d.context_field,
                        "answers_field": d.answers_field})
        tokenizer = self.tokenizer()
        check_vocabulary(tokenizer, as_texts(splits.column("train", d.context_field)), splits.where,
                         self.config.model.name)
        train, train_examples = self.windows(splits, "train", tokenizer)
        prepared = {}
        for split in splits.evaluation_splits:
            arrays, examples = self.windows(splits, split, tokenizer)
            arrays["example"] = examples
            arrays["contexts"] = object_array(as_texts(splits.column(split, d.context_field)))
            arrays["answers"] = object_array([[text for text, _ in answer_spans(a, splits.where)]
                                              for a in splits.column(split, d.answers_field)])
            prepared[split] = arrays
        del train["offsets"]
        labels, names = self.partition_labels(splits)
        return TaskData(train, prepared["test"], self.info, labels, names, train_examples=train_examples,
                        validation=prepared.get("validation"))

    def tokenizer(self):
        tokenizer = load_tokenizer(self.config.model.name)
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"question_answering needs a fast tokenizer (character offsets); model.name "
                            f"'{self.config.model.name}' has a slow one")
        tokenizer.padding_side = "right"  # question first, then the context windows
        return tokenizer

    def windows(self, splits: Splits, split: str, tokenizer) -> tuple[Arrays, np.ndarray]:
        """Token windows of (question, context) with their labelled answer span; and the example of each."""
        d, o = self.config.data, self.options
        questions = [q.strip() for q in as_texts(splits.column(split, o.question_field))]
        contexts = as_texts(splits.column(split, o.context_field))
        answers = [answer_spans(a, splits.where) for a in splits.column(split, o.answers_field)]
        check_answer_offsets(contexts, answers, f"{splits.where} ({split} split)")
        stride = o.doc_stride or d.max_length // 4
        longest = max(len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"])
        room = d.max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
        if room <= stride:
            raise DataError(f"a {split} question of {splits.where} has {longest} tokens: with data.max_length="
                            f"{d.max_length} that leaves {max(room, 0)} for the context, not more than "
                            f"data.doc_stride={stride}; raise data.max_length or lower data.doc_stride")
        enc = tokenizer(questions, contexts, truncation="only_second", max_length=d.max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
        examples = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
        starts, ends = np.zeros(len(examples), dtype=np.int64), np.zeros(len(examples), dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int32)  # (windows, max_length, 2) character spans
        in_context = np.array([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(examples))], dtype=bool)
        offsets[~in_context] = NOT_CONTEXT
        cls = tokenizer.cls_token_id
        for i, example in enumerate(examples):
            ids = enc["input_ids"][i]
            starts[i] = ends[i] = ids.index(cls) if cls in ids else 0
            context = np.flatnonzero(in_context[i])
            if answers[example] and len(context):
                text, start_char = answers[example][0]
                end_char = start_char + len(text)
                spans = offsets[i, context]
                if spans[0, 0] <= start_char and spans[-1, 1] >= end_char:  # the answer lies in this window
                    starts[i] = context[np.argmax(spans[:, 1] > start_char)]
                    ends[i] = context[len(context) - 1 - np.argmax(spans[::-1, 0] < end_char)]
        arrays = {key: np.asarray(enc[key], dtype=np.int64) for key in ("input_ids", "attention_mask", "token_type_ids")
                  if key in enc}
        arrays.update({"start_positions": starts, "end_positions": ends, "offsets": offsets})
        return arrays, examples

    # ----------------------------------------------------------------- every process
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict[str, float]:
        rows_total = len(data["input_ids"])
        width = data["input_ids"].shape[1]
        start_logits = np.full((rows_total, width), -np.inf, dtype=np.float32)
        end_logits = np.full((rows_total, width), -np.inf, dtype=np.float32)
        loss_sum = 0.0
        for rows in batches(rows_total, batch_size):
            out = model(**self.batch(data, rows, device))
            length = out.start_logits.shape[1]  # the batch is cut to its longest window
            start_logits[rows, :length] = out.start_logits.float().cpu().numpy()
            end_logits[rows, :length] = out.end_logits.float().cpu().numpy()
            loss_sum += float(out.loss) * len(rows)
        predictions = best_spans(start_logits, end_logits, data["offsets"], data["example"], data["contexts"],
                                 self.options.max_answer_length)
        scored = [(p, golds) for p, golds in zip(predictions, data["answers"]) if golds]
        exact = [max(exact_match(p, g) for g in golds) for p, golds in scored]
        f1 = [max(f1_score(p, g) for g in golds) for p, golds in scored]
        return {"test_exact_match": float(np.mean(exact)) if exact else float("nan"),
                "test_f1": float(np.mean(f1)) if f1 else float("nan"),
                "test_loss": loss_sum / rows_total}


def answer_spans(value: Any, where: str) -> list[tuple[str, int]]:
    """(text, start character) of each gold answer: SQuAD's ``{"text", "answer_start"}``, a list of
    ``{"text", "answer_start"}`` dicts, or MRQA's ``{"text", "char_spans"}``."""
    if isinstance(value, dict) and "text" in value and "answer_start" in value:
        return [(str(t), int(s)) for t, s in zip(value["text"], value["answer_start"])]
    if isinstance(value, dict) and "text" in value and "char_spans" in value:
        return [(str(t), int(span["start"][0])) for t, span in zip(value["text"], value["char_spans"])]
    if isinstance(value, list) and all(isinstance(v, dict) and "text" in v and "answer_start" in v for v in value):
        return [(str(v["text"]), int(v["answer_start"])) for v in value]
    raise DataError(f"the answers of {where} are not in SQuAD format ({{'text': [...], 'answer_start': [...]}}); "
                    f"found {str(value)[:80]!r}")


def check_answer_offsets(contexts: list[str], answers: list[list[tuple[str, int]]], where: str) -> None:
    """Refuse answers that are not at their start offset in the context: training would label other text."""
    wrong = [(row, text, start) for row, (context, spans) in enumerate(zip(contexts, answers))
             for text, start in spans if start < 0 or context[start:start + len(text)] != text]
    if wrong:
        row, text, start = wrong[0]
        found = contexts[row][max(start, 0):max(start, 0) + len(text)]
        raise DataError(f"{len(wrong)} answers of {where} are not at their answer_start in the context (e.g. row "
                        f"{row + 1}: {text!r} at {start}, where the context has {found!r}); answer_start must be "
                        f"the answer's character offset")


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, window_example: np.ndarray,
               contexts: np.ndarray, max_answer_length: int) -> list[str]:
    """The predicted answer text of every example: its best valid span over all its windows."""
    best: dict[int, tuple[float, str]] = {}
    for window, example in enumerate(window_example):
        starts = np.argsort(start_logits[window])[::-1][:N_BEST]
        ends = np.argsort(end_logits[window])[::-1][:N_BEST]
        for s in starts:
            for e in ends:
                if offsets[window, s, 0] == NOT_CONTEXT or offsets[window, e, 0] == NOT_CONTEXT:
                    continue
                if e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start_logits[window, s] + end_logits[window, e])
                if example not in best or score > best[example][0]:
                    best[example] = (score, contexts[example][offsets[window, s, 0]:offsets[window, e, 1]])
    return [best.get(example, (0.0, ""))[1] for example in range(len(contexts))]


# SQuAD v1.1's official evaluation (rajpurkar.github.io/SQuAD-explorer, evaluate-v1.1.py), copied rather than
# imported: the `evaluate` library's "squad" metric is this same script, but it downloads it from the hub
# at run time, which machines without hub access cannot do.
def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a / an / the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    predicted, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(predicted) & Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)
