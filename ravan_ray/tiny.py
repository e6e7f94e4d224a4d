"""Tiny models (config only) and small datasets for every task: ``ravan-ray tiny DIR``.

A machine without hub access can still run every task end to end: each model directory holds a
``config.json`` and tokenizer / image-processor files but no weights, so :mod:`ravan_ray.models` builds
the model from the config with the run seed; the datasets are generated here from a seed. The tests use
them, the README's example commands use them, and a user checks a cluster set-up with them before
spending GPU hours on the real models. Everything here is generated: no third-party data, no licence
question.

DIR/models/
  vit/      ViT, 16 x 16 images in 4 x 4 patches, hidden 32, 2 layers; ViT image processor
  llama/    LLaMA, hidden 64, 2 layers, grouped-query attention; a byte-level BPE tokenizer trained here on
            the instruction data, with <s> and </s> and, as real LLaMA tokenizers, no pad token
  t5/       T5, d_model 64, 2 + 2 layers; a BPE tokenizer with T5's <pad> (0), </s> (1), <unk> (2)
  bert/     BERT, hidden 32, 2 layers; MiniLM's WordPiece tokenizer
DIR/data/
  images/        image folder: 4 classes of striped pictures by colour (red, green, blue, grey)
  topics/        the synthetic 12-class text task (train / test .jsonl, label_names.json)
  pairs/         sentence pairs: same topic and sentiment, same topic only, or unrelated (3 classes)
  instructions/  Alpaca-layout instructions with one-word answers, and a category column
  squad/         SQuAD-format questions about short made-up biographies, and a category column
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ravan_ray.data import make_synthetic

IMAGE_SIZE = 16
IMAGE_CLASSES = ("red", "green", "blue", "grey")
_HUES = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "grey": (128, 128, 128)}


def write_tiny_assets(out: str | Path, seed: int = 0) -> Path:
    """Write every tiny model and dataset under ``out`` (see the module docstring); returns ``out``."""
    out = Path(out)
    data, models = out / "data", out / "models"
    write_images(data / "images", seed)
    write_topics(data / "topics", seed)
    write_pairs(data / "pairs", seed)
    write_instructions(data / "instructions", seed)
    write_squad(data / "squad", seed)
    write_vit(models / "vit")
    write_llama(models / "llama", data / "instructions")
    write_t5(models / "t5", data / "topics")
    write_bert(models / "bert")
    return out


# ---------------------------------------------------------------------------------------------------- data
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def striped_image(hue: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A size x size RGB picture of the class's hue: stripes of a random orientation and width in a light and
    a dark shade of it, each shade jittered, plus pixel noise. The class is the colour, the stripes texture:
    a tiny model built from a config learns it in a few rounds."""
    y, x = np.mgrid[0:size, 0:size]
    width = int(rng.integers(2, 5))
    phase = int(rng.integers(width))
    orientation = int(rng.integers(4))
    pattern = ((y + phase) // width, (x + phase) // width, (x + y + phase) // width, x // width + y // width)[orientation] % 2
    base = np.array(_HUES[hue], dtype=float)
    shades = np.stack([base * rng.uniform(0.45, 0.7), np.minimum(base * rng.uniform(1.0, 1.25), 255)])
    image = shades[pattern] + rng.normal(0, 18, size=(size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, seed: int, train_per_class: int = 150, test_per_class: int = 25) -> None:
    from PIL import Image

    rng = np.random.default_rng([seed, 11])
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for hue in IMAGE_CLASSES:
            target = folder / split / hue
            target.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(striped_image(hue, rng)).save(target / f"{i:03d}.png")


def write_topics(folder: Path, seed: int) -> None:
    data = make_synthetic(train_size=600, test_size=120, seed=seed)
    _write_jsonl(folder / "train.jsonl", [{"text": t, "label": int(y), "label_name": data.label_names[y]}
                                          for t, y in zip(data.train_texts, data.train_labels)])
    _write_jsonl(folder / "test.jsonl", [{"text": t, "label": int(y), "label_name": data.label_names[y]}
                                         for t, y in zip(data.test_texts, data.test_labels)])
    (folder / "label_names.json").write_text(json.dumps(data.label_names))


PAIR_LABELS = ("same", "related", "unrelated")


def write_pairs(folder: Path, seed: int) -> None:
    """Sentence pairs in three classes, balanced: the same topic and sentiment ("same"), the same topic
    with another sentiment ("related"), another topic ("unrelated")."""
    data = make_synthetic(train_size=1200, test_size=240, seed=seed + 1)
    rng = np.random.default_rng([seed, 12])
    for split, texts, labels in (("train", data.train_texts, data.train_labels),
                                 ("test", data.test_texts, data.test_labels)):
        topic, sentiment = labels // 3, labels % 3
        rows = []
        for i in range(len(texts)):
            label = PAIR_LABELS[i % 3]
            match = {"same": (topic == topic[i]) & (sentiment == sentiment[i]),
                     "related": (topic == topic[i]) & (sentiment != sentiment[i]),
                     "unrelated": topic != topic[i]}[label]
            match[i] = False
            candidates = np.flatnonzero(match)
            j = int(candidates[rng.integers(len(candidates))])
            rows.append({"sentence1": texts[i], "sentence2": texts[j], "label": label})
        _write_jsonl(folder / f"{split}.jsonl", rows)


_WORDS = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "early": "late",
          "light": "dark", "full": "empty", "happy": "sad", "strong": "weak", "rich": "poor", "wet": "dry",
          "loud": "quiet", "young": "old", "hard": "soft", "high": "low"}


def instruction_rows(rng: np.random.Generator, count: int) -> list[dict]:
    """Alpaca-layout rows with one-word answers in three categories (antonyms, parity, topics)."""
    opposites = {**_WORDS, **{v: k for k, v in _WORDS.items()}}
    topics = make_synthetic(train_size=120, test_size=12, seed=int(rng.integers(1 << 30)))
    rows = []
    for _ in range(count):
        kind = int(rng.integers(3))
        if kind == 0:
            word = list(opposites)[int(rng.integers(len(opposites)))]
            rows.append({"instruction": "Give the opposite of the word.", "input": word, "output": opposites[word],
                         "category": "antonyms"})
        elif kind == 1:
            n = int(rng.integers(1, 100))
            rows.append({"instruction": f"Is the number {n} even or odd?", "input": "",
                         "output": "even" if n % 2 == 0 else "odd", "category": "parity"})
        else:
            i = int(rng.integers(len(topics.train_texts)))
            rows.append({"instruction": "Name the topic of the sentence in one word.", "input": topics.train_texts[i],
                         "output": topics.label_names[topics.train_labels[i]].split("/")[0], "category": "topics"})
    return rows


def write_instructions(folder: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 13])
    _write_jsonl(folder / "train.jsonl", instruction_rows(rng, 480))
    _write_jsonl(folder / "test.jsonl", instruction_rows(rng, 60))


_NAMES = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
          "Marek", "Nora", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq"]
_CITIES = ["Lisbon", "Oslo", "Krakow", "Valencia", "Lyon", "Graz", "Porto", "Tampere", "Bologna", "Utrecht"]
_JOBS = ["baker", "pilot", "nurse", "carpenter", "teacher", "chemist", "gardener", "librarian", "welder", "tailor"]


def squad_rows(rng: np.random.Generator, count: int) -> list[dict]:
    """SQuAD-format rows: a few made-up biographies per context, a question about one of them."""
    rows = []
    for k in range(count):
        people = rng.choice(len(_NAMES), size=3, replace=False)
        facts = [(_NAMES[p], _CITIES[int(rng.integers(len(_CITIES)))], _JOBS[int(rng.integers(len(_JOBS)))])
                 for p in people]
        context = " ".join(f"{name} lives in {city} and works as a {job}." for name, city, job in facts)
        name, city, job = facts[int(rng.integers(3))]
        if rng.random() < 0.5:
            question, answer, category = f"Where does {name} live?", city, "residence"
            start = context.index(f"{name} lives in ") + len(f"{name} lives in ")
        else:
            question, answer, category = f"What does {name} work as?", job, "occupation"
            sentence = context.index(f"{name} lives in ")
            start = context.index(f"works as a {job}", sentence) + len("works as a ")
        assert context[start:start + len(answer)] == answer
        rows.append({"id": f"q{k}", "question": question, "context": context, "category": category,
                     "answers": {"text": [answer], "answer_start": [start]}})
    return rows


def write_squad(folder: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 14])
    _write_jsonl(folder / "train.jsonl", squad_rows(rng, 480))
    _write_jsonl(folder / "test.jsonl", squad_rows(rng, 60))


# -------------------------------------------------------------------------------------------------- models
def write_vit(folder: Path) -> None:
    from transformers import ViTConfig

    from ravan_ray.logs import quiet_transformers

    folder.mkdir(parents=True, exist_ok=True)
    ViTConfig(image_size=IMAGE_SIZE, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    with quiet_transformers():  # without torchvision the processor notes that it uses its PIL backend
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)


def _corpus(folder: Path, fields: tuple[str, ...]) -> list[str]:
    rows = [json.loads(line) for file in sorted(folder.glob("*.jsonl")) for line in file.read_text().splitlines()]
    return [str(row[f]) for row in rows for f in fields if f in row]


def _bpe(corpus: list[str], special: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def write_llama(folder: Path, instructions: Path) -> None:
    from tokenizers import processors
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from ravan_ray.tasks.causal_lm import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    # The Alpaca templates repeated, so that BPE learns them as a few tokens, as large tokenizers do.
    corpus = _corpus(instructions, ("instruction", "input", "output")) + [ALPACA_WITH_INPUT, ALPACA_NO_INPUT] * 200
    tok = _bpe(corpus, ["<unk>", "<s>", "</s>"], vocab_size=1000)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=False).save_pretrained(folder)


def write_t5(folder: Path, topics: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config

    names = json.loads((topics / "label_names.json").read_text())
    tok = _bpe(_corpus(topics, ("text", "label_name")) + names, ["<pad>", "</s>", "<unk>"], vocab_size=600)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    T5Config(vocab_size=tok.get_vocab_size(), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
             num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
             tie_word_embeddings=True).save_pretrained(folder)


def write_bert(folder: Path) -> None:
    from transformers import BertConfig

    from ravan_ray.models import offline_minilm_path

    folder.mkdir(parents=True, exist_ok=True)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=512).save_pretrained(folder)
    source = Path(offline_minilm_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
