"""ravan-ray: a Ray-orchestrated simulation platform for federated fine-tuning with multi-head LoRA.

A regular package, not a namespace package: a Ray job ships its working directory to every node, and with a
namespace package Python would merge the shipped ``ravan_ray/`` and an installed one into a single package whose
modules come from either copy.
"""
