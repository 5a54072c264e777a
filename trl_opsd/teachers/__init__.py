"""Teachers behind one protocol: what they can score or generate, and the remote backends' shared machinery.

- ``base``: :class:`Teacher`, capabilities, :class:`TopKScores`, :class:`Generation`.
- ``openai_compat``: vLLM / OpenAI-spec servers (top-k and sampled-token scoring, chat generation).
- ``cortex``: Snowflake Cortex REST (generation only).
- ``routing``: per-row routing and weighted blending of several teachers.
- ``http`` / ``cache`` / ``sse``: retries, concurrency, metrics; the response cache; the SSE parser.
"""

from .base import (
    CAPABILITIES,
    Generation,
    RowScores,
    Teacher,
    TeacherCapabilityError,
    TeacherError,
    TopKScores,
)
from .cache import ResponseCache
from .cortex import CortexAuth, CortexTeacher
from .http import RemoteAuthError, RemoteTeacherError, RetryPolicy, SecretSource
from .openai_compat import OpenAICompatTeacher, TokenizerMismatchError, TokenMappingError
from .routing import TeacherBlend, TeacherRouter, WeightedScores

__all__ = [
    "CAPABILITIES",
    "CortexAuth",
    "CortexTeacher",
    "Generation",
    "OpenAICompatTeacher",
    "RemoteAuthError",
    "RemoteTeacherError",
    "ResponseCache",
    "RetryPolicy",
    "RowScores",
    "SecretSource",
    "Teacher",
    "TeacherBlend",
    "TeacherCapabilityError",
    "TeacherError",
    "TeacherRouter",
    "TokenMappingError",
    "TokenizerMismatchError",
    "TopKScores",
    "WeightedScores",
]
