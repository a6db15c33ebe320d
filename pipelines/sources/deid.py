"""De-identification of DICOM input: keyed scan IDs, the secret key, and a last check on what leaves.

Three defences, from the outside in:

1. **Names.** A DICOM series is known to the archive only by :func:`keyed_scan_id` of its
   ``StudyInstanceUID/SeriesInstanceUID``: ``dcm-`` and the first 20 hex digits of
   ``HMAC-SHA256(secret, key)``. The UIDs never reach storage, and without the secret nobody can
   test a guessed UID against an ID (a plain hash could be checked against a hospital's UID list).
   The same series under the same secret always gets the same ID, so re-ingest is idempotent.
2. **Attributes.** The DICOM reader copies into ``SourceVolume.attrs`` only a *whitelist* of
   technical attributes (:data:`pipelines.sources.dicom.ATTRIBUTE_WHITELIST`), never a blacklist
   filter of the header: whatever the PS3.15 basic profile lists, private tags, and attributes added
   to the standard next year all stay behind because they are not on the list.
3. **The check.** :func:`assert_no_phi` refuses attrs that carry a keyword of the basic profile
   (:data:`BASIC_PROFILE_KEYWORDS`), any ``...UID`` key, or a UID-shaped value, at any depth. It is
   a tripwire for a wrong whitelist edit, not the mechanism.

Errors: :class:`DeidKeyError` (no usable secret; a ``ValueError``) and :class:`PhiLeakError` (attrs
that would leak; a ``ValueError``). Neither message ever contains the secret or the leaking value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BASIC_PROFILE_KEYWORDS",
    "MIN_KEY_BYTES",
    "DeidKeyError",
    "PhiLeakError",
    "assert_no_phi",
    "keyed_scan_id",
    "load_secret",
]

#: Shortest secret accepted (bytes); HMAC-SHA256 keys shorter than this are guessable.
MIN_KEY_BYTES = 16

#: Hex digits of the HMAC kept in a scan ID (80 bits: no collision in any real archive).
_ID_HEX = 20

_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UID_VALUE = re.compile(r"^\s*[0-9]+(\.[0-9]+){3,}\s*$")

#: Identifying attributes of the DICOM PS3.15 Annex E basic application level confidentiality
#: profile (Table E.1-1), by pydicom keyword: patient, visit, study, staff, institution, device
#: identity, dates and times, UIDs, and free-text fields that can carry any of them.
BASIC_PROFILE_KEYWORDS: frozenset[str] = frozenset(
    {
        # patient
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
        "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
        "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientReligiousPreference",
        "PatientComments", "PatientState", "PatientTransportArrangements", "PatientSexNeutered",
        "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
        "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "ReferencedPatientSequence", "ReferencedPatientAliasSequence", "MedicalRecordLocator",
        "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService", "CountryOfResidence",
        "RegionOfResidence", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate",
        "MedicalAlerts", "Allergies", "AdditionalPatientHistory", "SpecialNeeds",
        "InsurancePlanIdentification", "ResponsiblePerson", "ResponsibleOrganization",
        # visit and request
        "AccessionNumber", "AdmissionID", "IssuerOfAdmissionID", "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence", "AdmittingDate", "AdmittingTime", "CurrentPatientLocation",
        "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeID",
        "DischargeDiagnosisDescription", "VisitComments", "ReasonForStudy", "RequestAttributesSequence",
        "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureComments",
        "RequestedProcedureLocation", "RequestingPhysician", "RequestingService",
        "ImagingServiceRequestComments", "OrderCallbackPhoneNumber", "OrderEnteredBy",
        "OrderEntererLocation", "ScheduledPatientInstitutionResidence", "PreMedication",
        # study, series, procedure
        "StudyID", "StudyDate", "StudyTime", "StudyDescription", "StudyComments", "SeriesDate",
        "SeriesTime", "SeriesDescription", "AcquisitionDate", "AcquisitionTime",
        "AcquisitionDateTime", "ContentDate", "ContentTime", "OverlayDate", "OverlayTime",
        "CurveDate", "CurveTime", "ProtocolName", "AcquisitionComments", "AcquisitionContextSequence",
        "AcquisitionDeviceProcessingDescription", "ContrastBolusAgent", "DerivationDescription",
        "ImageComments", "FrameComments", "IdentifyingComments", "TextComments", "TextString",
        "PerformedProcedureStepID", "PerformedProcedureStepDescription",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
        "PerformedProcedureStepEndDate", "CommentsOnThePerformedProcedureStep", "PerformedLocation",
        "ScheduledProcedureStepDescription", "ScheduledProcedureStepStartDate",
        "ScheduledProcedureStepEndDate", "ScheduledProcedureStepLocation", "SourceImageSequence",
        "ReferencedImageSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
        "ModifiedAttributesSequence", "OriginalAttributesSequence", "IconImageSequence",
        "DataSetTrailingPadding", "Impressions", "ResultsComments", "InterpretationText",
        "InterpretationDiagnosisDescription",
        # people
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence", "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
        "ScheduledPerformingPhysicianName", "ScheduledPerformingPhysicianIdentificationSequence",
        "PhysicianApprovingInterpretation", "InterpretationRecorder", "InterpretationTranscriber",
        "InterpretationAuthor", "ContentCreatorName", "VerifyingObserverName",
        "VerifyingObserverSequence", "VerifyingOrganization", "AuthorObserverSequence",
        "ParticipantSequence", "PersonName", "PersonAddress", "PersonTelephoneNumbers",
        "HumanPerformerName", "HumanPerformerOrganization", "NamesOfIntendedRecipientsOfResults",
        # institution and equipment
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "DetectorID", "GantryID",
        "GeneratorID", "PerformedStationName", "PerformedStationAETitle", "ScheduledStationName",
        "ScheduledStationAETitle", "ModifyingDeviceID", "CustodialOrganizationSequence",
        # UIDs
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
        "SynchronizationFrameOfReferenceUID", "ReferencedSOPInstanceUID", "MediaStorageSOPInstanceUID",
        "InstanceCreatorUID", "IrradiationEventUID", "DeviceUID", "StorageMediaFileSetUID",
        "ConcatenationUID", "DimensionOrganizationUID", "TargetUID", "UID",
    }
)  # fmt: skip


class DeidKeyError(ValueError):
    """No usable de-identification secret: missing, unreadable or shorter than :data:`MIN_KEY_BYTES`."""


class PhiLeakError(ValueError):
    """Attributes about to leave a reader hold an identifying DICOM attribute or a UID."""


def keyed_scan_id(key: str, secret: bytes, prefix: str = "dcm") -> str:
    """The archive's name for a scan whose identity must not be stored.

    ``prefix + "-" + HMAC-SHA256(secret, key)[:20 hex]``, e.g. ``dcm-3f2a9c0d41b7e6a85c12``: a valid
    scan ID (``[A-Za-z0-9._-]``, 24 characters for the default prefix), deterministic for one
    secret, unrelated across secrets, and not invertible or testable without the secret.

    Args:
        key: the identifying text, e.g. ``"<StudyInstanceUID>/<SeriesInstanceUID>"``.
        secret: the site's key, at least :data:`MIN_KEY_BYTES` bytes (see :func:`load_secret`).
        prefix: a short tag of the source kind: 1-64 characters of ``[A-Za-z0-9._-]``, starting
            with a letter or digit.

    Raises:
        DeidKeyError: ``secret`` is not bytes or is too short.
        ValueError: ``prefix`` is not a valid scan ID start.
    """
    if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_KEY_BYTES:
        found = f"{len(secret)} bytes" if isinstance(secret, (bytes, bytearray)) else type(secret).__name__
        raise DeidKeyError(
            f"de-identification secret: expected bytes of length >= {MIN_KEY_BYTES}, found {found}"
        )
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise ValueError(
            f"keyed_scan_id prefix {prefix!r}: expected 1-64 characters of [A-Za-z0-9._-] starting with a "
            "letter or digit (e.g. 'dcm')"
        )
    digest = hmac.new(bytes(secret), key.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:_ID_HEX]}"


def load_secret(env_var: str = "MEDRECON_DEID_KEY", key_file: str | None = None) -> bytes:
    """The de-identification secret, from a key file or an environment variable.

    An explicit ``key_file`` wins over the environment (the caller asked for that file); its
    content is used as bytes with trailing whitespace (a final newline) removed. Otherwise the
    UTF-8 bytes of ``$env_var`` are used. Generate a key with e.g.
    ``python -c "import secrets; print(secrets.token_hex(32))"``, and keep it: a new key gives every
    DICOM series a new scan ID.

    Raises:
        DeidKeyError: the file cannot be read, neither source is set, or the key is shorter than
            :data:`MIN_KEY_BYTES` bytes. The message says how to provide one and never shows it.
    """
    how = (
        f"set the environment variable {env_var} to a random string of at least {MIN_KEY_BYTES} bytes "
        '(e.g. the output of `python -c "import secrets; print(secrets.token_hex(32))"`), '
        "or pass key_file= naming a file that holds it"
    )
    if key_file is not None:
        try:
            with open(key_file, "rb") as f:
                secret, source = f.read().rstrip(), f"key file {key_file!r}"
        except OSError as e:
            raise DeidKeyError(
                f"de-identification key file {key_file!r} cannot be read ({e.strerror}); {how}"
            ) from e
    else:
        value = os.environ.get(env_var, "")
        if not value:
            raise DeidKeyError(
                f"no de-identification secret: ${env_var} is unset or empty and no key_file given; {how}"
            )
        secret, source = value.encode("utf-8"), f"${env_var}"
    if len(secret) < MIN_KEY_BYTES:
        raise DeidKeyError(
            f"de-identification secret from {source} is {len(secret)} bytes; expected at least "
            f"{MIN_KEY_BYTES}; {how}"
        )
    return secret


def assert_no_phi(attrs: Mapping[str, Any]) -> None:
    """Refuse attributes that would carry identifying DICOM data out of a reader.

    Walks ``attrs`` (nested mappings and lists included) and raises if a key is a keyword of
    :data:`BASIC_PROFILE_KEYWORDS`, a key ends in ``UID`` or ``UIDs``, or a string value is shaped
    like a DICOM UID (``1.2.840...``: four or more dotted numbers).

    Raises:
        PhiLeakError: naming the path of the offending key (never its value).
    """

    def walk(value: Any, where: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                name = str(k)
                if name in BASIC_PROFILE_KEYWORDS or name.endswith(("UID", "UIDs")):
                    raise PhiLeakError(
                        f"attrs{where}[{name!r}] is an identifying DICOM attribute (PS3.15 basic profile); "
                        "expected only whitelisted technical attributes: drop it from the reader's output"
                    )
                walk(v, f"{where}[{name!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and _UID_VALUE.match(value):
            raise PhiLeakError(
                f"attrs{where} holds a DICOM UID-shaped value; expected no UID to leave a reader: drop it"
            )

    walk(attrs, "")
