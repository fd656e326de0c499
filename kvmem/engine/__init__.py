"""kvmem.engine: a reference continuous-batching loop over kvmem's allocators.

A small Llama-architecture model (:mod:`.model`, HF weight names; random
weights or a local checkpoint, :mod:`.weights`), a scheduler with chunked
prefill and preemption (:mod:`.scheduler`), policies ``fcfs``, ``isrtf``
and ``fair`` (:mod:`.policies`), output-length predictors
(:mod:`.predictors`), and the engine that ties them together
(:mod:`.engine`), with sessions that keep a conversation's KV between
turns (:mod:`.sessions`). Memory is reached only through
:class:`~kvmem.allocator.KVAllocator`, by the scheduler alone: the executor
gets each step's layout and layers' KV as a :class:`StepKV`.
"""

from kvmem.engine.clock import SimClock, WallClock
from kvmem.engine.config import PRESETS, ModelConfig, preset
from kvmem.engine.engine import Engine, EngineConfig
from kvmem.engine.errors import InvalidRequest, SwapUnavailable
from kvmem.engine.executor import Executor, ModelExecutor
from kvmem.engine.metrics import EngineMetrics, RequestMetrics
from kvmem.engine.model import LlamaModel
from kvmem.engine.policies import FCFS, ISRTF, Fair, Policy, make_policy
from kvmem.engine.predictors import (
    LearnedPredictor,
    LengthPredictor,
    NoisyOraclePredictor,
    OraclePredictor,
)
from kvmem.engine.request import (
    Completion,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from kvmem.engine.scheduler import Scheduler, SchedulerConfig, StepKV
from kvmem.engine.sessions import SessionBusy
from kvmem.engine.simulate import CostModel, SimulatedExecutor
from kvmem.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from kvmem.engine.weights import load_model, random_model

__all__ = [
    "FCFS",
    "ISRTF",
    "PRESETS",
    "ByteTokenizer",
    "Completion",
    "CostModel",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "Executor",
    "Fair",
    "HFTokenizer",
    "InvalidRequest",
    "LearnedPredictor",
    "LengthPredictor",
    "LlamaModel",
    "ModelConfig",
    "ModelExecutor",
    "NoisyOraclePredictor",
    "OraclePredictor",
    "Policy",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SessionBusy",
    "SimClock",
    "SimulatedExecutor",
    "StepKV",
    "SwapUnavailable",
    "TokenLogprob",
    "WallClock",
    "load_model",
    "load_tokenizer",
    "make_policy",
    "preset",
    "random_model",
]
