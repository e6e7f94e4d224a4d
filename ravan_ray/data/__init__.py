"""Data every task shares: load a dataset's splits (synthetic default, local files, image folders,
Hugging Face hub ids), split it across clients (iid or label-Dirichlet: partition.py), tokenize.

Sources, chosen by :func:`load_splits` from the ``data`` config section:

- ``name="banking77"`` (the default): Banking77, 77 intents of customer queries to a bank, shipped with
  the package under CC BY 4.0 (``ravan_ray/data_files/banking77/README.md``); no network needed.
- ``name="banking77-instruct"``: the same Banking77 as instruction data in the Alpaca layout (the query as
  ``input``, the intent's name as ``output``) for ``causal_lm``; ``as_instructions=true`` does the same to any
  labelled source (:func:`ravan_ray.data.instructions.classification_as_instructions`).
- ``name="synthetic"`` (tests): a 12-class text task generated here from the seed, see
  :func:`make_synthetic`.
- ``path=`` a local csv / jsonl / json / parquet file, a directory holding ``train.*`` and ``test.*``
  (the layout of ``shared/data/*``: fields ``text``, ``label``, ``label_name`` and a ``label_names.json``
  beside them), or an image folder (``train/<class>/*.png``, ``test/<class>/*.png``). Read with
  ``datasets.load_dataset("csv" | "json" | "parquet" | "imagefolder")``.
- any other ``name``: a Hugging Face hub dataset id (``subset`` picks its configuration, ``train_split``
  / ``test_split`` its splits), via ``datasets.load_dataset``. Offline (``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE``, read at call time) only the local cache is tried.

A task (ravan_ray/tasks/) takes the columns it needs from the splits. Every problem a user can cause
raises :class:`DataError` with a one-line message (the CLI prints it and exits with code 2). Nothing here
imports Ray: clients get plain arrays.

The rooms: ``sources.py`` (the splits of each kind of source), ``splits.py`` (the :class:`Splits` every source
returns, label encoding), ``instructions.py`` (labelled texts as instruction data), ``partition.py`` (clients'
shares), ``synthetic.py`` (the generated task), ``text.py`` (what text tasks share: tokenizing), ``errors.py``
(:class:`DataError`).
"""

from ravan_ray.data.errors import DataError
from ravan_ray.data.partition import PARTITION_KINDS, label_histogram, partition
from ravan_ray.data.sources import load_splits
from ravan_ray.data.splits import Splits, encode_labels, is_class_id
from ravan_ray.data.synthetic import make_synthetic
from ravan_ray.data.text import TextClassificationData, as_texts, check_vocabulary, tokenize

__all__ = ["DataError", "PARTITION_KINDS", "Splits", "TextClassificationData", "as_texts", "check_vocabulary", "encode_labels",
           "is_class_id", "label_histogram", "load_splits", "make_synthetic", "partition", "tokenize"]
