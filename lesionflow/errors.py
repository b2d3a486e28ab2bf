"""Named errors: every bad input a user can cause maps to one of these, with a message that names
the offending key or file so the fix is obvious without reading a traceback."""


class LesionflowError(Exception):
    """Base class for errors the user can fix (bad config, bad data, bad registry request)."""


class ConfigError(LesionflowError):
    """params.yaml or a CLI override is invalid."""


class IngestError(LesionflowError):
    """The ingest source is unusable; nothing has been written."""


class UnreadableImageError(IngestError):
    """An image or mask file cannot be decoded."""


class MaskSizeMismatchError(IngestError):
    """A mask's height/width differ from its image's."""


class OrphanMaskError(IngestError):
    """A mask exists without a matching image."""


class DuplicateIdError(IngestError):
    """Two source files map to the same record id."""


class EmptySourceError(IngestError):
    """The source holds no images."""


class AreaRatioError(IngestError):
    """A weak label's area ratio (or its error) lies outside [0, 1]."""


class MetadataError(IngestError):
    """The metadata CSV is missing a configured column or refers to unknown ids."""


class DatasetVersionError(LesionflowError):
    """DVC could not version, push or restore a dataset."""


class RegistryError(LesionflowError):
    """A registry request (alias, version, rollback target) cannot be satisfied."""


class GateError(RegistryError):
    """The promotion gate cannot compare candidate and champion fairly."""


class ReproduceError(LesionflowError):
    """A registered version cannot be rebuilt from its lineage (missing params, data, code)."""


class InvalidImageError(LesionflowError):
    """Bytes sent for segmentation are not a readable image."""


class ImageSizeError(LesionflowError):
    """An image's sides lie outside the limits the server accepts."""


class VideoError(LesionflowError):
    """Video synthesis or label propagation cannot run on the given frames or masks."""


class KeyFrameError(VideoError):
    """A video has no frame with a mask to serve as key frame (nothing to roll masks from)."""


class FrameShapeError(VideoError):
    """Frames, masks or loss inputs disagree in shape or value range."""


class CorrectionError(LesionflowError):
    """A batch of reviewer corrections is unusable (no mask, no model version); nothing is stored."""


class WeakLabelError(LesionflowError):
    """Area-ratio weak labelling cannot run on this input (e.g. a record without an area ratio,
    a feature map too small for the requested superpixels)."""


class ExportError(LesionflowError):
    """A dataset or predictions folder cannot be exported, or an export does not read back."""


class WarmStartError(LesionflowError):
    """``train.init_from`` names a version whose weights cannot start this training (another
    architecture, or one model per lesion type where one shared model is trained)."""


class LeaseHeldError(LesionflowError):
    """Another holder has the lease (see ``lesionflow.lease``); the message names it, since when it
    holds it and when it expires unless renewed. Nothing was changed."""


class LeaseLostError(LesionflowError):
    """A lease this process held was released, or expired and was taken over by another holder:
    work done under it must not be committed."""


class ServiceUnavailableError(LesionflowError):
    """An outside service (the MLflow tracking server, the S3 store or DVC remote) did not answer
    within the retry budget; the message names the service, its address and what to do."""


class TrackingUnavailableError(ServiceUnavailableError):
    """The MLflow tracking server is unreachable or answers with server errors."""


class RemoteUnavailableError(ServiceUnavailableError, DatasetVersionError):
    """The DVC remote (a folder or S3) cannot be reached; pushes are idempotent, so a rerun after
    the service returns completes."""


class TrackingNotConnectedError(LesionflowError):
    """MLflow was used before ``tracking.connect``: it would have written ``./mlflow.db`` in
    whatever folder the process runs in."""


class ReloadError(LesionflowError):
    """The server could not resolve, load or warm up the version its alias names now (the message
    names the cause); it keeps serving the version it had."""


class PseudonymKeyError(ConfigError):
    """The pseudonym key is missing or too weak: on a cluster it must come from the credentials
    Secret (``LESIONFLOW_PSEUDONYM_KEY``), since pods share no workdir to keep a local key in."""


class BurnedInAnnotationError(IngestError):
    """A DICOM file says ``BurnedInAnnotation: YES``: patient text in the pixels survives any header
    clean-up, so the image is refused."""


class DatasetError(LesionflowError):
    """A folder given as a canonical dataset is not one: no ``manifest.jsonl`` (not written by
    ``lesionflow ingest``) or a manifest line that does not parse."""


class EmptySplitError(LesionflowError):
    """A step needs labelled records of a split (train, val for model selection, test for the
    evaluation) and the dataset has none; the message names the ``ingest.split`` fraction to give."""


class SubmitError(LesionflowError):
    """The KFP endpoint answered but refused a submission (unknown experiment, no access, ...)."""


class ShardError(DatasetError):
    """A sharded dataset cannot be written or read: files no record names, a shard that does not
    match its index or its records' hashes, fewer shards than ranks that must each read their own."""


class PredictionLogError(LesionflowError):
    """The prediction log (``serve.log_dir``) or its kept images cannot be read or written."""


class ReviewError(LesionflowError):
    """A review batch cannot be made: no candidates (no unlabelled records, no kept images), an
    unknown strategy, or an output folder that is not empty."""


class TrainJobError(LesionflowError):
    """Training on several nodes (a Kubeflow Trainer TrainJob) could not start, failed, or left no
    model; the message names the TrainJob, its namespace and the reason the cluster gave."""


class TrainJobFailedError(TrainJobError):
    """The TrainJob ended Failed; it is kept (not deleted) so its pods' logs can be read."""


class TrainJobTimeoutError(TrainJobError):
    """The TrainJob did not finish within ``cluster.train.timeout_minutes``; it was deleted."""


class AnnotationFormatError(CorrectionError, IngestError):
    """A reviewer tool's export or a dataset in a field format (Label Studio JSON, CVAT XML, COCO,
    nnU-Net raw, a review batch) does not parse or does not match its images; the message names the
    file and the task, image or case. Nothing has been stored."""
