"""Logging helpers: quieten a library's messages that mean nothing for a run (used by the model loading, the
driver and the privacy accountant)."""

from __future__ import annotations

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_logger(name: str, least: int = logging.ERROR):
    """Only messages of level ``least`` and above from the logger ``name`` while inside (a library's warning that
    means nothing for the run)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(least)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info for a developer (a load report listing the new head's "missing" weights, the
    image processor's fallback to its PIL backend without torchvision) is noise for a run that means it."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%": a blink for a local checkpoint
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
