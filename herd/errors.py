"""Every error herd raises on purpose. Each says what is wrong and with which file or field."""


class HerdError(Exception):
    """Base class: catch this to handle any error herd raises deliberately."""


class FormatError(HerdError):
    """A weight or tokenizer file cannot be read as what it claims to be."""


class BadMagic(FormatError):
    """The file does not start with the bytes its format requires."""


class TruncatedFile(FormatError):
    """The file ends before the data its header promises."""


class MissingTensor(FormatError):
    """A tensor the architecture needs is not in the checkpoint."""


class UnexpectedTensor(FormatError):
    """The checkpoint holds a tensor the architecture has no place for."""


class ShapeMismatch(FormatError):
    """A tensor's shape disagrees with the config."""


class UnsafePickle(FormatError):
    """A .pth file holds something other than plain tensors (refused by weights_only loading)."""


class UnsupportedArchitecture(HerdError):
    """The config names an architecture, or a setting that changes the maths, herd does not implement."""


class SamplingError(HerdError, ValueError):
    """A sampling parameter out of its range (temperature, top_p, seed, ...). `field` names it. A ValueError
    too, so callers that caught ValueError before keep working."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}{'' if problem.startswith('[') else ' '}{problem}")
        self.field, self.problem = field, problem


class TrainingDiverged(HerdError):
    """A fine-tuning step produced a non-finite loss or gradient: the run stops there, nothing is written."""


class ConfigError(HerdError):
    """A config is missing a field or holds an impossible value."""


class ContextOverflow(HerdError):
    """The prompt plus the tokens asked for do not fit in the model's context."""


class ModelNotFound(HerdError):
    """A source is neither a path that exists nor a known alias."""


class TemplateError(HerdError):
    """A chat template failed to render, or tried something the sandbox forbids."""


class DataError(HerdError):
    """A training or evaluation data file holds a line that is not what its format needs, or an example
    that does not fit; the message names the file and line."""


class ImageError(HerdError):
    """An image that cannot be used: not an image Pillow can read, empty, truncated, larger than the pixel
    limit, or given to a model that cannot see images. The message names the image."""
