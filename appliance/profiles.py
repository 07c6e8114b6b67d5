"""Which protocol profile plans a study, and why.

The rules, first match wins:

1. an explicit choice (``airt plan --profile NAME``);
2. the called AE title the study was sent to, when a profile answers as that AE title (one AE title
   per workflow, as a TPS exports to "AIRT_SBRT" or "AIRT_CHHIP");
3. the calling AE title that sent it, when a profile lists it;
4. the dose in the PTV's name (``PTV_6000`` -> 60 Gy), among the profiles with ``match_ptv_name``;
5. ``planning.profile``.

When in doubt the study is not planned: instances sent to two AE titles that choose different
profiles, or a PTV whose name carries a dose other than the chosen profile's, fail the job with the
reason (a PTV named ``PTV_6000`` is never planned to 40 Gy because it came in on the default AE title).
An explicit ``--profile`` is a person's decision: a PTV-name mismatch is then logged, not refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.config import Profile, Settings, ptv_name_dose_gy
from core.errors import InputError

log = logging.getLogger(__name__)

#: Largest difference between the dose in a PTV's name and a profile's dose that still matches, Gy.
DOSE_MATCH_TOLERANCE_GY = 0.01


def _prescribes(profile: Profile, dose_gy: float) -> bool:
    """Whether a profile prescribes this dose (the one a PTV's name carries)."""
    return math.isclose(dose_gy, profile.dose_gy, abs_tol=DOSE_MATCH_TOLERANCE_GY)


@dataclass(frozen=True)
class ProfileChoice:
    """The profile a study is planned with and the reason, as recorded in the job."""

    profile: Profile
    reason: str

    def to_dict(self) -> dict[str, object]:
        """For ``metrics.json``."""
        p = self.profile
        return {"name": p.name, "reason": self.reason, "dose_Gy": p.dose_gy, "fractions": p.fractions,
                "protocol": p.protocol}


def _by_aet(profiles: Iterable[Profile], aets: Iterable[str], titles_of: Callable[[Profile], set[str]],
            what: str) -> tuple[str, str] | None:
    """(profile name, the AE title that chose it) when the study's AE titles choose one profile,
    None when they choose none; InputError when they choose two."""
    chosen: dict[str, set[str]] = {}
    for aet in {a.strip() for a in aets}:
        for p in profiles:
            if aet in titles_of(p):
                chosen.setdefault(p.name, set()).add(aet)
    if len(chosen) > 1:
        detail = "; ".join(f"{sorted(a)} -> {name}" for name, a in sorted(chosen.items()))
        raise InputError(f"the study's instances came by {what} that choose different profiles ({detail}); "
                         "send the whole study to one AE title, then airt jobs retry")
    if not chosen:
        return None
    (name, found), = chosen.items()
    return name, sorted(found)[0]


def choose_profile(settings: Settings, *, ptv_name: str, called_aets: Iterable[str] = (),
                   calling_aets: Iterable[str] = (), explicit: str | None = None) -> ProfileChoice:
    """The profile for a study (see the module docstring for the rules).

    Raises
    ------
    InputError
        When the study's AE titles choose two profiles, or its PTV's name carries a dose the chosen
        profile does not prescribe (the job fails with this message).
    ConfigError
        When ``explicit`` names no profile.
    """
    named_dose = ptv_name_dose_gy(ptv_name)
    if explicit:
        profile = settings.profile(explicit)
        if named_dose is not None and not _prescribes(profile, named_dose):
            log.warning("PTV %r names %.4g Gy but profile %s (chosen by --profile) prescribes %.4g Gy",
                        ptv_name, named_dose, profile.name, profile.dose_gy)
        return ProfileChoice(profile, f"chosen explicitly (--profile {profile.name})")

    choice: ProfileChoice | None = None
    called = _by_aet(settings.profiles, called_aets, lambda p: {p.called_ae_title.strip()} - {""},
                     "called AE titles")
    calling = _by_aet(settings.profiles, calling_aets, lambda p: {a.strip() for a in p.calling_ae_titles},
                      "calling AE titles")
    if called:
        choice = ProfileChoice(settings.profile(called[0]), f"sent to called AE title {called[1]}")
    elif calling:
        choice = ProfileChoice(settings.profile(calling[0]), f"sent by calling AE title {calling[1]}")
    if choice is None and named_dose is not None:
        for p in settings.profiles:
            if p.match_ptv_name and _prescribes(p, named_dose):
                choice = ProfileChoice(p, f"the PTV's name {ptv_name!r} carries {named_dose:.4g} Gy")
                break
    if choice is None:
        choice = ProfileChoice(settings.profile(), "the default profile (planning.profile)")
    p = choice.profile
    if named_dose is not None and not _prescribes(p, named_dose):
        raise InputError(
            f"the PTV {ptv_name!r} names {named_dose:.4g} Gy but profile {p.name} ({choice.reason}) prescribes "
            f"{p.dose_gy:.4g} Gy in {p.fractions} fractions; not planned. Send the study to the AE title of a "
            f"{named_dose:.4g} Gy profile, add one to [[profiles]], or rename the PTV; then airt jobs retry"
        )
    return choice
