"""De-identification: DICOM headers to the PS3.15 Basic Application Level Confidentiality Profile,
and keyed pseudonyms for everything that names a patient (patient ids, UIDs, file and folder names).

The profile's action table (PS3.15 Table E.1-1, edition 2026c) is dicom-anonymizer's, which tracks
the standard; the engine applying it is here, because ours must differ from that library's in three
ways: it recurses into every sequence (the library applies per-attribute rules at the top level
only, so a name inside a kept sequence survives), UIDs and the patient id become keyed HMAC-SHA256
pseudonyms that agree across files, runs and machines sharing the key (the library draws random
UIDs per process), and the header is never written back as a DICOM object, so no IOD needs a
conditional attribute kept: X/Z, X/D, X/Z/D and X/Z/U* remove, Z/D empties.

The key is ``LESIONFLOW_PSEUDONYM_KEY`` (on a cluster: a key of the credentials Secret). A local run
without it creates a random key once in the workdir, so its runs agree with each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from lesionflow.errors import PseudonymKeyError

KEY_ENV = "LESIONFLOW_PSEUDONYM_KEY"
KEY_FILE = "pseudonym.key"
MIN_KEY_CHARS = 32
PROFILE_EDITION = "dicomfields_2026c"
METHOD = "PS3.15 E.1 Basic Profile, keyed pseudonyms (lesionflow)"

# dicom-anonymizer's table categories → the one action this engine takes
_CATEGORY_ACTION = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z", "X_Z_TAGS": "X",
    "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "X",
}
PATIENT_ID = Tag("PatientID")  # Z/D in the table; here the keyed pseudonym that groups a patient
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TEXT_DUMMY = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D", "DS": "0",
          "IS": "0"}


def _load_table() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    """(exact tag → action, repeating-group rules (group, element, group mask, element mask,
    action): the curve groups 50xx and the overlay data and comments of groups 60xx)."""
    exact: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    table = dicom_anonymization_database_selector(PROFILE_EDITION)
    for category, action in _CATEGORY_ACTION.items():
        for entry in table[category]:
            if len(entry) == 2:
                exact[Tag(*entry)] = action
            else:
                masked.append((*entry, action))
    exact[PATIENT_ID] = "P"
    return exact, masked


ACTIONS, MASKED_ACTIONS = _load_table()


def action_for(tag: BaseTag, vr: str) -> str | None:
    """The profile's action for one attribute (None: keep). Private attributes are removed, and so
    is every person name the table does not list: a name is identifying wherever it stands."""
    if tag.is_private:
        return "X"
    action = ACTIONS.get(tag)
    if action is None:
        action = next((a for g, e, gm, em, a in MASKED_ACTIONS
                       if tag.group & gm == g & gm and tag.element & em == e & em), None)
    if action is None and vr == "PN":
        action = "Z"
    return action


class Pseudonyms:
    """One-way names keyed with the secret. Without the key a pseudonym cannot be recomputed from a
    guessed patient id or file name, as an unkeyed hash of a numeric record number can in seconds;
    with it, the same input always gives the same pseudonym, so a patient's files stay one group
    and a source ingested again gets the same record ids."""

    def __init__(self, key: bytes):
        self._key = key

    def _digest(self, kind: bytes, value: str) -> bytes:
        return hmac.new(self._key, kind + b"\0" + value.encode(), hashlib.sha256).digest()

    def name(self, value: str) -> str:
        """``p-`` and 16 hex digits (64 bits) for a record id, patient id, file or folder name."""
        return "p-" + self._digest(b"name", value).hex()[:16]

    def uid(self, value: str) -> str:
        """A UID under the 2.25 root (at most 44 characters): same UID in, same UID out, so the
        references between the files of a study still agree."""
        return "2.25." + str(int.from_bytes(self._digest(b"uid", value)[:16], "big"))


def _replaced_uid(elem: DataElement, pseudonyms: Pseudonyms):
    if elem.VM > 1:
        return [pseudonyms.uid(str(v)) for v in elem.value]
    return pseudonyms.uid(str(elem.value)) if elem.value else elem.value


def _dummy(elem: DataElement, pseudonyms: Pseudonyms):
    """The profile's D: a non-empty value of the right VR that says nothing."""
    if elem.VR == "UI":
        return _replaced_uid(elem, pseudonyms)
    if elem.VR == "SQ":
        return []  # nothing in a replaced sequence is worth a dummy
    if elem.VR in _DUMMY:
        return _DUMMY[elem.VR]
    if elem.VR in BINARY_VRS:
        return b""
    if elem.VR in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"):
        return _TEXT_DUMMY
    return 0  # binary numbers: US, SS, UL, SL, UV, SV, FL, FD, AT


def _clean(ds: Dataset, pseudonyms: Pseudonyms) -> None:
    for elem in list(ds):
        action = action_for(elem.tag, elem.VR)
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = elem.empty_value
        elif action == "D":
            elem.value = _dummy(elem, pseudonyms)
        elif action == "U":
            elem.value = _replaced_uid(elem, pseudonyms)
        elif action == "P":
            patient_id = str(elem.value or "").strip()
            elem.value = pseudonyms.name(patient_id) if patient_id else elem.empty_value
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, pseudonyms)


def deidentify(ds: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """Apply the basic profile in place: the dataset, every nested sequence and the file meta
    header (its SOP Instance UID is a U). Marks the dataset de-identified, as the profile asks."""
    _clean(ds, pseudonyms)
    if getattr(ds, "file_meta", None) is not None:
        _clean(ds.file_meta, pseudonyms)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    return ds


def header_json(ds: Dataset) -> dict:
    """A de-identified header as DICOM JSON without binary values (pixel data, LUTs, icons): what
    a reviewer wants to know about the acquisition, in a form a text search can check."""

    def drop_binary(dataset: Dataset, elem: DataElement) -> None:
        if elem.VR in BINARY_VRS:
            del dataset[elem.tag]

    ds.walk(drop_binary)
    return ds.to_json_dict(suppress_invalid_tags=True)


def load_key(workdir: str | Path) -> bytes:
    """The pseudonym key: ``LESIONFLOW_PSEUDONYM_KEY``; without it, on a local run only, a random
    key created once as ``<workdir>/pseudonym.key`` (mode 0600). A cluster has no workdir its
    pods share, so there a missing variable is an error rather than a new key per pod (which
    would give one patient different pseudonyms in every run)."""
    value = os.environ.get(KEY_ENV, "").strip()
    if value:
        if len(value) < MIN_KEY_CHARS:
            raise PseudonymKeyError(
                f"{KEY_ENV} has {len(value)} characters; use at least {MIN_KEY_CHARS} random ones "
                "(e.g. `openssl rand -hex 32`): a short key can be guessed from known pseudonyms")
        return value.encode()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise PseudonymKeyError(
            f"{KEY_ENV} is not set: on a cluster the pseudonym key must come from the credentials "
            f"Secret (cluster.credentials_secret). Add a key {KEY_ENV} with at least "
            f"{MIN_KEY_CHARS} random characters (e.g. `openssl rand -hex 32`) and keep it: a new "
            "key gives every patient and file new pseudonyms")
    return _local_key(Path(workdir) / KEY_FILE)


def _read_key(path: Path) -> bytes:
    value = path.read_text().strip()
    if len(value) < MIN_KEY_CHARS:
        raise PseudonymKeyError(f"pseudonym key file {path} holds {len(value)} characters (at "
                                f"least {MIN_KEY_CHARS} needed); delete it to have a new one made, "
                                f"or set {KEY_ENV}")
    return value.encode()


def _local_key(path: Path) -> bytes:
    """Create the key file atomically (a hard link cannot replace an existing file), so two runs
    starting at once end up with the same key."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pseudonym-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another run made it first: use theirs
        finally:
            os.unlink(tmp)
    return _read_key(path)
