"""Instruction tuning of a decoder-only model (``AutoModelForCausalLM``): the federated-LLM setting of
FlowerTune, OpenFedLLM and FederatedScope-LLM.

Data: jsonl / csv / parquet or a hub id in the Alpaca layout: ``data.prompt_field`` (``instruction``),
the optional ``data.input_field`` (``input``: used where the data has the column; an explicitly set one
must exist) and ``data.response_field`` (``output``).

Prompt format: the tokenizer's chat template where it has one (the instruction, then a blank line and
the input, as the user's turn; the response as the assistant's turn); else the Stanford Alpaca template
(with or without its "### Input:" block). Loss on the response tokens only: the prompt's labels are
-100, so the model is not trained to reproduce instructions. The response ends with the tokenizer's
end-of-sequence token (with a chat template: whatever the template closes the assistant's turn with),
so the model learns to stop.

Lengths: prompt + response is cut to ``data.max_length`` tokens, from the response's end. A prompt that
leaves no room for a single response token is an error naming how many examples do so
(``data.long_prompts: skip`` drops those examples instead, and says how many).

Metrics: ``test_loss`` (mean cross-entropy per response token over the test split), ``test_perplexity``
(its exponential), and ``test_accuracy``: the share of test prompts whose greedy completion, decoded
without special tokens and stripped of surrounding white space, equals the reference response stripped
likewise. Exact match is useful where responses are short (a label word, a number); with long
free-text responses set ``data.max_new_tokens: 0`` to skip generation (test_accuracy is then empty).
``max_new_tokens`` unset generates as many tokens as the longest reference response has (with its end
token). Runs are ranked by ``test_loss``, which every configuration has.

A tokenizer without a pad token pads with its end-of-sequence token; padded positions are masked out
of attention and loss, so the choice changes nothing. Generation pads prompts on the left, as
decoder-only generation needs.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from ravan_ray.data import DataError, Splits, as_texts
from ravan_ray.models import load_tokenizer
from ravan_ray.tasks.base import (Arrays, GenerationOptions, Task, TaskData, batches, greedy_exact_match, object_array,
                                  mean_of_row_means, token_losses)

# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
IGNORE = -100  # label of a position that does not count in the loss (transformers' convention)


class CausalLMOptions(GenerationOptions):
    prompt_field: str = "instruction"
    input_field: Optional[str] = "input"  # used where the data has it
    response_field: str = "output"
    # What to do with examples whose prompt leaves no room for a response within data.max_length.
    long_prompts: Literal["error", "skip"] = "error"


class CausalLM(Task):
    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    options_model = CausalLMOptions
    new_head = False  # the pretrained LM head predicts the response tokens
    metrics = {"test_loss": "min", "test_perplexity": "min", "test_accuracy": "max"}
    primary_metric = "test_loss"
    input_keys = ("input_ids", "attention_mask", "labels")

    # ----------------------------------------------------------------- driver
    def prepare(self) -> TaskData:
        d = self.options
        splits = self.load_splits()
        input_field = self.input_field(splits)
        splits.require({"prompt_field": d.prompt_field, "response_field": d.response_field, "input_field": input_field})
        tokenizer = self.tokenizer()
        encoded = {}
        for split in ("train", *splits.evaluation_splits):
            prompts = self.prompts(splits, split, input_field, tokenizer)
            responses = as_texts(splits.column(split, d.response_field))
            encoded[split] = self.encode(prompts, responses, tokenizer, splits.where, split)
        train, train_keep, _ = encoded["train"]
        del train["prompt_length"]
        if d.max_new_tokens != 0:
            # Generation length from the test split's references alone, so a validation split changes nothing in test.
            wanted = d.max_new_tokens
            self.info["max_new_tokens"] = int(wanted if wanted is not None else max(encoded["test"][2]))
        prepared = {}
        for split in splits.evaluation_splits:
            arrays, keep, _ = encoded[split]
            prompt_lengths = arrays.pop("prompt_length")
            if d.max_new_tokens != 0:
                arrays.update(self.generation_arrays(arrays, prompt_lengths, tokenizer))
                references = as_texts(splits.column(split, d.response_field))
                arrays["references"] = object_array([references[i].strip() for i in keep])
            prepared[split] = arrays
        labels, names = self.partition_labels(splits)
        if labels is not None:
            labels = labels[train_keep]
        return TaskData(train, prepared["test"], self.info, labels, names, validation=prepared.get("validation"))

    def input_field(self, splits: Splits) -> Optional[str]:
        """``data.input_field`` where the data has it; an explicitly set one must exist (require() says so)."""
        d = self.options
        field_name = d.input_field
        if field_name and "input_field" not in d.model_fields_set and field_name not in splits.train.column_names:
            return None
        return field_name

    def tokenizer(self):
        tokenizer = load_tokenizer(self.config.model.name)
        if tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer of model.name '{self.config.model.name}' has no end-of-sequence token; "
                            f"instruction tuning needs one to end responses")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.info["pad_token_id"] = int(tokenizer.pad_token_id)
        self.info["eos_token_ids"] = sorted({int(tokenizer.eos_token_id)})
        return tokenizer

    def prompts(self, splits: Splits, split: str, input_field: Optional[str], tokenizer) -> list[str]:
        instructions = as_texts(splits.column(split, self.options.prompt_field))
        inputs = as_texts(splits.column(split, input_field)) if input_field else [""] * len(instructions)
        if tokenizer.chat_template:
            return [f"{i}\n\n{x}" if x.strip() else i for i, x in zip(instructions, inputs)]
        return [ALPACA_WITH_INPUT.format(instruction=i, input=x) if x.strip() else ALPACA_NO_INPUT.format(instruction=i)
                for i, x in zip(instructions, inputs)]

    def token_pairs(self, prompts: list[str], responses: list[str], tokenizer) -> tuple[list, list]:
        """(prompt ids, response ids) per example, the boundary exact: each part is tokenised on its own."""
        eos = tokenizer.eos_token_id
        if tokenizer.chat_template:
            users = [[{"role": "user", "content": p}] for p in prompts]
            prompt_texts = [tokenizer.apply_chat_template(u, tokenize=False, add_generation_prompt=True) for u in users]
            full = [tokenizer.apply_chat_template(u + [{"role": "assistant", "content": r}], tokenize=False)
                    for u, r in zip(users, responses)]
            # What the template adds after the prompt: the response and the turn's closing tokens.
            rest = [f[len(p):] if f.startswith(p) else r for f, p, r in zip(full, prompt_texts, responses)]
            prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
            response_ids = [ids if ids and ids[-1] == eos else ids + [eos]
                            for ids in tokenizer(rest, add_special_tokens=False)["input_ids"]]
            return prompt_ids, response_ids
        prompt_ids = [ids[:-1] if ids and ids[-1] == eos else ids  # some tokenizers end every text with eos
                      for ids in tokenizer(prompts)["input_ids"]]
        response_ids = [ids + [eos] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]
        return prompt_ids, response_ids

    def encode(self, prompts: list[str], responses: list[str], tokenizer, where: str, split: str):
        """(right-padded input_ids / attention_mask / labels (-100 on prompt and padding) / prompt_length,
        the indices of the examples kept, their response lengths in tokens)."""
        max_length = self.config.data.max_length
        prompt_ids, response_ids = self.token_pairs(prompts, responses, tokenizer)
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= max_length]
        if too_long and self.options.long_prompts == "error":
            longest = max(len(prompt_ids[i]) for i in too_long)
            raise DataError(f"{len(too_long)} {split} prompts of {where} leave no room for a response within "
                            f"data.max_length={max_length} (the longest has {longest} tokens); raise data.max_length "
                            f"or set data.long_prompts=skip")
        keep = np.array([i for i in range(len(prompt_ids)) if len(prompt_ids[i]) < max_length], dtype=np.int64)
        if len(too_long):
            print(f"ravan-ray: skipped {len(too_long)} {split} examples whose prompt fills data.max_length={max_length}")
        if len(keep) == 0:
            raise DataError(f"no {split} example of {where} fits data.max_length={max_length}")
        pad = tokenizer.pad_token_id
        input_ids = np.full((len(keep), max_length), pad, dtype=np.int64)
        labels = np.full((len(keep), max_length), IGNORE, dtype=np.int64)
        mask = np.zeros((len(keep), max_length), dtype=np.int64)
        prompt_length = np.zeros(len(keep), dtype=np.int64)
        for row, i in enumerate(keep):
            sequence = (prompt_ids[i] + response_ids[i])[:max_length]
            input_ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
            labels[row, len(prompt_ids[i]):len(sequence)] = sequence[len(prompt_ids[i]):]
            prompt_length[row] = len(prompt_ids[i])
        arrays = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "prompt_length": prompt_length}
        return arrays, keep, [len(response_ids[i]) for i in keep]

    def generation_arrays(self, test: Arrays, lengths: np.ndarray, tokenizer) -> Arrays:
        """Left-padded prompts for greedy generation."""
        width = int(lengths.max())
        prompt_ids = np.full((len(lengths), width), tokenizer.pad_token_id, dtype=np.int64)
        prompt_mask = np.zeros((len(lengths), width), dtype=np.int64)
        for row, length in enumerate(lengths):
            prompt_ids[row, width - length:] = test["input_ids"][row, :length]
            prompt_mask[row, width - length:] = 1
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}

    # ----------------------------------------------------------------- every process
    def model_overrides(self) -> dict[str, Any]:
        return {"pad_token_id": self.info["pad_token_id"]}

    def row_losses(self, model: nn.Module, inputs: dict[str, torch.Tensor],
                   widths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the next-token cross-entropy summed over its response tokens, and their number (the model
        predicts token t + 1 from the tokens up to t, as transformers' causal LM loss shifts its labels)."""
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return token_losses(logits[:, :-1], inputs["labels"][:, 1:])

    def example_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Under DP-SGD: each example's mean over its own target tokens, then the mean over examples (the
        training loss is a token mean over the whole batch, in which one example's gradient would depend on the
        other examples' token counts)."""
        return mean_of_row_means(self.row_losses(model, inputs))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: dict[str, Any], batch_size: int, device: torch.device) -> dict[str, float]:
        loss_sum, tokens = 0.0, 0
        for rows in batches(len(data["labels"]), batch_size):
            inputs = self.batch(data, rows, device)
            counted = int((inputs["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
            loss_sum += float(model(**inputs).loss) * counted
            tokens += counted
        loss = loss_sum / max(tokens, 1)
        metrics = {"test_loss": loss, "test_perplexity": math.exp(min(loss, 700.0))}
        if "references" in data:
            metrics["test_accuracy"] = greedy_exact_match(model, data, batch_size, device, self.info,
                                                          self.decoding_tokenizer(), ("prompt_ids", "prompt_mask"),
                                                          continues_prompt=True)
        return metrics
