"""The benchmark: measuring a model (``measure``), the quality gate (``quality``), the records under
results/ (``record``), and the run that ties them together (``benchmark``); ``bytes_read`` counts what a decoded
token reads from the launch plans; ``peers`` runs mlx-lm beside it.
"""

from .measure import (  # noqa: F401
    PrimitiveCount, RunTiming, Spread, VIEW_PRIMITIVES, count_primitives, decode_step_primitives, environment,
    git_commit, local_now, timed_run,
)
from .quality import (  # noqa: F401
    CACHE_NAME, NEAR_TIE, QUALITY_TOKENS, QualityGateError, REFERENCE_OPTIONS, Reference, ReferenceCache,
    cache_dir, compute_reference, consistency_reason, degenerate_reason, first_difference, path_gaps,
    prompt_digest, quality_hash, quality_verdict, reference_walk, tie_note,
)
from .record import (  # noqa: F401
    BenchmarkResult, JSONL_NAME, MARKDOWN_HEADER, MARKDOWN_NAME, append_jsonl, compare_table, format_table,
    insert_entry, load_entries, log_line, markdown_entry, record, record_rejected, rejected_record,
)
from .benchmark import (  # noqa: F401
    PROMPT_FILE, benchmark_prompt, check_counts, gpu_bytes_read, run_benchmark,
)
from .bytes_read import (  # noqa: F401
    GGUFBytes, PlanBytes, TokenBytes, compare, gguf_bytes, plan_bytes, token_bytes,
)
