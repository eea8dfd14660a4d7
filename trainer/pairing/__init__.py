"""The pairing service: one named Ray actor per run holds a ring bank of recent labeled samples pushed by
every worker, and answers each unlabeled embedding with its best-matching labeled sample (image, mask).

Workers talk to it through `PairingClient`: one call a step (`exchange`), which carries the worker's
previous labeled batch for the bank and its unlabeled embeddings, and waits at most `pairing.deadline_s` for
the answer. A late or failed answer makes the worker pair in-batch for that step and count a fallback (the
service drops a call that waited past the deadline, so it never works through a backlog), so training never
waits longer than the deadline and never dies because of the service. A crashed actor is restarted by Ray
(`pairing.max_restarts`) with an empty bank that refills from new pushes; workers keep their handle.
Outside Ray (single-process runs), and with `pairing.mode: worker`, the same service object lives in the
worker's process, and its bank takes every rank's labeled batches at each step's end: the same bank on every
rank at any world size, checkpointed and rebuilt on resume (`PairingClient`).
"""
from .bank import PairingBank, from_uint8, mask_to_uint8, to_uint8
from .client import PairingClient, bank_failures
from .service import (NAMESPACE, LabeledBatch, PairingService, exchange_args, read_answer, service_name,
                      start_service)

__all__ = ["NAMESPACE", "LabeledBatch", "PairingBank", "PairingClient", "PairingService", "bank_failures",
           "exchange_args", "from_uint8", "mask_to_uint8", "read_answer", "service_name", "start_service",
           "to_uint8"]
