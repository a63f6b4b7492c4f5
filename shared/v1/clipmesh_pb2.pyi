import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    IDLE: _ClassVar[WorkerState]
    BUSY: _ClassVar[WorkerState]
    LOST: _ClassVar[WorkerState]

class JobOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_OUTCOME_UNSPECIFIED: _ClassVar[JobOutcome]
    JOB_OUTCOME_DONE: _ClassVar[JobOutcome]
    JOB_OUTCOME_CANCELLED: _ClassVar[JobOutcome]
    JOB_OUTCOME_FAILED: _ClassVar[JobOutcome]
    JOB_OUTCOME_FAILED_AFTER_CANCEL: _ClassVar[JobOutcome]
    JOB_OUTCOME_ABORTED: _ClassVar[JobOutcome]
    JOB_OUTCOME_REFUSED: _ClassVar[JobOutcome]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
WORKER_STATE_UNSPECIFIED: WorkerState
IDLE: WorkerState
BUSY: WorkerState
LOST: WorkerState
JOB_OUTCOME_UNSPECIFIED: JobOutcome
JOB_OUTCOME_DONE: JobOutcome
JOB_OUTCOME_CANCELLED: JobOutcome
JOB_OUTCOME_FAILED: JobOutcome
JOB_OUTCOME_FAILED_AFTER_CANCEL: JobOutcome
JOB_OUTCOME_ABORTED: JobOutcome
JOB_OUTCOME_REFUSED: JobOutcome

class SubmitJobRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "num_frames", "height", "width", "num_inference_steps", "guidance_scale", "seed", "model", "strategy", "num_workers", "fps", "clip_parallel", "block_pipeline", "savers", "checkpoint_every", "max_attempts", "guidance_scale_2", "image", "cfg_parallel", "shard_weights", "loras")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    SAVERS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_2_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CFG_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    SHARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    model: str
    strategy: str
    num_workers: int
    fps: float
    clip_parallel: ClipParallelOptions
    block_pipeline: BlockPipelineOptions
    savers: SaverOptions
    checkpoint_every: int
    max_attempts: int
    guidance_scale_2: float
    image: bytes
    cfg_parallel: bool
    shard_weights: bool
    loras: _containers.RepeatedCompositeFieldContainer[LoraRef]
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., strategy: _Optional[str] = ..., num_workers: _Optional[int] = ..., fps: _Optional[float] = ..., clip_parallel: _Optional[_Union[ClipParallelOptions, _Mapping]] = ..., block_pipeline: _Optional[_Union[BlockPipelineOptions, _Mapping]] = ..., savers: _Optional[_Union[SaverOptions, _Mapping]] = ..., checkpoint_every: _Optional[int] = ..., max_attempts: _Optional[int] = ..., guidance_scale_2: _Optional[float] = ..., image: _Optional[bytes] = ..., cfg_parallel: _Optional[bool] = ..., shard_weights: _Optional[bool] = ..., loras: _Optional[_Iterable[_Union[LoraRef, _Mapping]]] = ...) -> None: ...

class LoraRef(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class SaverOptions(_message.Message):
    __slots__ = ("slice_chunks", "step_cache", "tiled_decode")
    SLICE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_FIELD_NUMBER: _ClassVar[int]
    TILED_DECODE_FIELD_NUMBER: _ClassVar[int]
    slice_chunks: int
    step_cache: str
    tiled_decode: bool
    def __init__(self, slice_chunks: _Optional[int] = ..., step_cache: _Optional[str] = ..., tiled_decode: _Optional[bool] = ...) -> None: ...

class ClipParallelOptions(_message.Message):
    __slots__ = ("local_halo", "global_frames", "phase_bias", "entropy_scaling", "global_phase", "noise_reschedule", "spectral_blend", "global_rope")
    LOCAL_HALO_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PHASE_BIAS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_SCALING_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_PHASE_FIELD_NUMBER: _ClassVar[int]
    NOISE_RESCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_BLEND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ROPE_FIELD_NUMBER: _ClassVar[int]
    local_halo: int
    global_frames: int
    phase_bias: float
    entropy_scaling: bool
    global_phase: float
    noise_reschedule: bool
    spectral_blend: bool
    global_rope: str
    def __init__(self, local_halo: _Optional[int] = ..., global_frames: _Optional[int] = ..., phase_bias: _Optional[float] = ..., entropy_scaling: _Optional[bool] = ..., global_phase: _Optional[float] = ..., noise_reschedule: _Optional[bool] = ..., spectral_blend: _Optional[bool] = ..., global_rope: _Optional[str] = ...) -> None: ...

class BlockPipelineOptions(_message.Message):
    __slots__ = ("block_frames", "context_frames")
    BLOCK_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    block_frames: int
    context_frames: int
    def __init__(self, block_frames: _Optional[int] = ..., context_frames: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "request", "error", "created_at", "started_at", "finished_at", "worker_ids", "video_size", "video_sha256", "strategy", "video_frames", "attempt", "checkpoint_step", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_SIZE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_SHA256_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    request: SubmitJobRequest
    error: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    video_size: int
    video_sha256: str
    strategy: str
    video_frames: int
    attempt: int
    checkpoint_step: int
    owner: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., worker_ids: _Optional[_Iterable[str]] = ..., video_size: _Optional[int] = ..., video_sha256: _Optional[str] = ..., strategy: _Optional[str] = ..., video_frames: _Optional[int] = ..., attempt: _Optional[int] = ..., checkpoint_step: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetPreviewRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("frame", "frames_written", "png")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    frame: int
    frames_written: int
    png: bytes
    def __init__(self, frame: _Optional[int] = ..., frames_written: _Optional[int] = ..., png: _Optional[bytes] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("job_id", "was_running")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    was_running: bool
    def __init__(self, job_id: _Optional[str] = ..., was_running: _Optional[bool] = ...) -> None: ...

class FetchVideoRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class VideoChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "seq", "time", "state", "step", "frames", "log")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    state: StateChange
    step: StepProgress
    frames: FramesReceived
    log: LogMessage
    def __init__(self, job_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[StateChange, _Mapping]] = ..., step: _Optional[_Union[StepProgress, _Mapping]] = ..., frames: _Optional[_Union[FramesReceived, _Mapping]] = ..., log: _Optional[_Union[LogMessage, _Mapping]] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "detail")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    detail: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("worker_id", "rank", "step", "total_steps", "latent_start", "latent_end", "seconds", "bytes_sent", "bytes_received", "comm_seconds", "block", "peak_memory_bytes", "full_pass", "attempt", "role")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LATENT_START_FIELD_NUMBER: _ClassVar[int]
    LATENT_END_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_PASS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    rank: int
    step: int
    total_steps: int
    latent_start: int
    latent_end: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    comm_seconds: float
    block: int
    peak_memory_bytes: int
    full_pass: bool
    attempt: int
    role: str
    def __init__(self, worker_id: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., latent_start: _Optional[int] = ..., latent_end: _Optional[int] = ..., seconds: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., comm_seconds: _Optional[float] = ..., block: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., full_pass: _Optional[bool] = ..., attempt: _Optional[int] = ..., role: _Optional[str] = ...) -> None: ...

class FramesReceived(_message.Message):
    __slots__ = ("worker_id", "first_frame", "num_frames")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    first_frame: int
    num_frames: int
    def __init__(self, worker_id: _Optional[str] = ..., first_frame: _Optional[int] = ..., num_frames: _Optional[int] = ...) -> None: ...

class LogMessage(_message.Message):
    __slots__ = ("level", "text", "worker_id")
    class Level(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        INFO: _ClassVar[LogMessage.Level]
        WARNING: _ClassVar[LogMessage.Level]
        ERROR: _ClassVar[LogMessage.Level]
    INFO: LogMessage.Level
    WARNING: LogMessage.Level
    ERROR: LogMessage.Level
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    level: LogMessage.Level
    text: str
    worker_id: str
    def __init__(self, level: _Optional[_Union[LogMessage.Level, str]] = ..., text: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("id", "state", "host", "device", "memory_bytes", "threads", "model", "speed", "current_job_id", "last_heartbeat", "denoiser_bytes", "loras")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DENOISER_BYTES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: WorkerState
    host: str
    device: str
    memory_bytes: int
    threads: int
    model: ModelInfo
    speed: float
    current_job_id: str
    last_heartbeat: _timestamp_pb2.Timestamp
    denoiser_bytes: int
    loras: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., host: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., speed: _Optional[float] = ..., current_job_id: _Optional[str] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., denoiser_bytes: _Optional[int] = ..., loras: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "spatial_multiple", "temporal_stride", "max_frames", "max_side", "strategies", "native_latent_frames", "clip_parallel_defaults", "num_layers", "attention_heads", "block_pipeline_defaults", "experts", "modes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPORAL_STRIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    NATIVE_LATENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CLIP_PARALLEL_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_PIPELINE_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    spatial_multiple: int
    temporal_stride: int
    max_frames: int
    max_side: int
    strategies: _containers.RepeatedScalarFieldContainer[str]
    native_latent_frames: int
    clip_parallel_defaults: ClipParallelOptions
    num_layers: int
    attention_heads: int
    block_pipeline_defaults: BlockPipelineOptions
    experts: int
    modes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., spatial_multiple: _Optional[int] = ..., temporal_stride: _Optional[int] = ..., max_frames: _Optional[int] = ..., max_side: _Optional[int] = ..., strategies: _Optional[_Iterable[str]] = ..., native_latent_frames: _Optional[int] = ..., clip_parallel_defaults: _Optional[_Union[ClipParallelOptions, _Mapping]] = ..., num_layers: _Optional[int] = ..., attention_heads: _Optional[int] = ..., block_pipeline_defaults: _Optional[_Union[BlockPipelineOptions, _Mapping]] = ..., experts: _Optional[int] = ..., modes: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CheckpointHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[CheckpointHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CheckpointHeader(_message.Message):
    __slots__ = ("job_id", "attempt", "worker_id", "step", "latent_start", "latent_end", "size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATENT_START_FIELD_NUMBER: _ClassVar[int]
    LATENT_END_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    worker_id: str
    step: int
    latent_start: int
    latent_end: int
    size: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., worker_id: _Optional[str] = ..., step: _Optional[int] = ..., latent_start: _Optional[int] = ..., latent_end: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class UploadCheckpointResponse(_message.Message):
    __slots__ = ("complete",)
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    complete: bool
    def __init__(self, complete: _Optional[bool] = ...) -> None: ...

class FetchCheckpointRequest(_message.Message):
    __slots__ = ("job_id", "step", "latent_start", "latent_end")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATENT_START_FIELD_NUMBER: _ClassVar[int]
    LATENT_END_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    latent_start: int
    latent_end: int
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., latent_start: _Optional[int] = ..., latent_end: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "store_ready", "progress", "result", "log")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STORE_READY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    store_ready: StoreReady
    progress: StepProgress
    result: JobResult
    log: LogMessage
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., store_ready: _Optional[_Union[StoreReady, _Mapping]] = ..., progress: _Optional[_Union[StepProgress, _Mapping]] = ..., result: _Optional[_Union[JobResult, _Mapping]] = ..., log: _Optional[_Union[LogMessage, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("worker_id", "host", "device", "memory_bytes", "threads", "model", "speed", "running", "incarnation", "denoiser_bytes", "loras")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    DENOISER_BYTES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    device: str
    memory_bytes: int
    threads: int
    model: ModelInfo
    speed: float
    running: RunningJob
    incarnation: int
    denoiser_bytes: int
    loras: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., speed: _Optional[float] = ..., running: _Optional[_Union[RunningJob, _Mapping]] = ..., incarnation: _Optional[int] = ..., denoiser_bytes: _Optional[int] = ..., loras: _Optional[_Iterable[str]] = ...) -> None: ...

class RunningJob(_message.Message):
    __slots__ = ("job_id", "attempt", "rank")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    rank: int
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreReady(_message.Message):
    __slots__ = ("job_id", "port", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    port: int
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., port: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "outcome", "error", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    outcome: JobOutcome
    error: str
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., outcome: _Optional[_Union[JobOutcome, str]] = ..., error: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("registered", "assignment", "rendezvous", "cancel")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assignment: Assignment
    rendezvous: Rendezvous
    cancel: Cancel
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("heartbeat_seconds", "session_key")
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: float
    session_key: str
    def __init__(self, heartbeat_seconds: _Optional[float] = ..., session_key: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job_id", "plan", "rank", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    plan: RenderPlan
    rank: int
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., plan: _Optional[_Union[RenderPlan, _Mapping]] = ..., rank: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class RenderPlan(_message.Message):
    __slots__ = ("request", "strategy", "world_size", "num_latent_frames", "clips", "start_step", "group_name", "timeout_seconds", "clip_parallel", "layers", "block_pipeline", "savers", "attempt", "checkpoint_every", "resume", "frames_in_video", "parallel")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LATENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CLIPS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIP_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_PIPELINE_FIELD_NUMBER: _ClassVar[int]
    SAVERS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_VIDEO_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    request: SubmitJobRequest
    strategy: str
    world_size: int
    num_latent_frames: int
    clips: _containers.RepeatedCompositeFieldContainer[ClipRange]
    start_step: int
    group_name: str
    timeout_seconds: int
    clip_parallel: ClipParallelOptions
    layers: _containers.RepeatedCompositeFieldContainer[LayerRange]
    block_pipeline: BlockPipelineOptions
    savers: SaverOptions
    attempt: int
    checkpoint_every: int
    resume: CheckpointInfo
    frames_in_video: int
    parallel: ParallelPlan
    def __init__(self, request: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., strategy: _Optional[str] = ..., world_size: _Optional[int] = ..., num_latent_frames: _Optional[int] = ..., clips: _Optional[_Iterable[_Union[ClipRange, _Mapping]]] = ..., start_step: _Optional[int] = ..., group_name: _Optional[str] = ..., timeout_seconds: _Optional[int] = ..., clip_parallel: _Optional[_Union[ClipParallelOptions, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerRange, _Mapping]]] = ..., block_pipeline: _Optional[_Union[BlockPipelineOptions, _Mapping]] = ..., savers: _Optional[_Union[SaverOptions, _Mapping]] = ..., attempt: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., resume: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., frames_in_video: _Optional[int] = ..., parallel: _Optional[_Union[ParallelPlan, _Mapping]] = ...) -> None: ...

class ParallelPlan(_message.Message):
    __slots__ = ("cfg", "shard_weights", "why")
    CFG_FIELD_NUMBER: _ClassVar[int]
    SHARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    cfg: int
    shard_weights: bool
    why: str
    def __init__(self, cfg: _Optional[int] = ..., shard_weights: _Optional[bool] = ..., why: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("step", "parts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    parts: _containers.RepeatedCompositeFieldContainer[CheckpointPart]
    def __init__(self, step: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[CheckpointPart, _Mapping]]] = ...) -> None: ...

class CheckpointPart(_message.Message):
    __slots__ = ("latent_start", "latent_end", "size")
    LATENT_START_FIELD_NUMBER: _ClassVar[int]
    LATENT_END_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    latent_start: int
    latent_end: int
    size: int
    def __init__(self, latent_start: _Optional[int] = ..., latent_end: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class ClipRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("job_id", "host", "port", "secret")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    host: str
    port: int
    secret: str
    def __init__(self, job_id: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., secret: _Optional[str] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("job_id", "attempt", "abort")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    abort: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., abort: _Optional[bool] = ...) -> None: ...

class FrameChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FrameHeader(_message.Message):
    __slots__ = ("job_id", "worker_id", "first_frame", "num_frames", "height", "width", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker_id: str
    first_frame: int
    num_frames: int
    height: int
    width: int
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., first_frame: _Optional[int] = ..., num_frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class UploadFramesResponse(_message.Message):
    __slots__ = ("frames_received",)
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    frames_received: int
    def __init__(self, frames_received: _Optional[int] = ...) -> None: ...
