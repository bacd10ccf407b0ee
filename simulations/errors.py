"""User-facing errors raised while reading, generating or fetching data sets."""

from fedrec.shared_model.errors import FedrecError


class DataError(FedrecError):
    """A data source is missing, malformed or unreachable; the message names the file and the fix."""
