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
