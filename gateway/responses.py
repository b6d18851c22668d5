"""The ONE place where a Decision (or a refusal's Reason) becomes an HTTP response and a page.

Pages are French unless the browser prefers English; API clients (no ``text/html`` in Accept) get JSON.
No page ever shows a stack trace, a token, or a detail meant for the audit trail only.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from flask import Request, Response, json, render_template

from gateway.policy.decision import Reason

LANGUAGES = ("fr", "en")


@dataclass(frozen=True, slots=True)
class Text:
    fr: str
    en: str

    def __call__(self, language: str) -> str:
        return self.en if language == "en" else self.fr


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    title: Text
    message: Text
    #: Offer the login choices (card / e-CPS) on the page.
    offer_login: bool = False


_LOGIN_AGAIN = Text("Veuillez vous identifier de nouveau.", "Please log in again.")

PAGES: dict[Reason, Page] = {
    Reason.UNAUTHENTICATED: Page(
        401,
        Text("Identification requise", "Login required"),
        Text(
            "Cette page contient des données de santé : identifiez-vous avec votre carte CPS ou votre e-CPS.",
            "This page holds health data: log in with your CPS card or your e-CPS.",
        ),
        offer_login=True,
    ),
    Reason.LOGIN_METHOD_NOT_ACCEPTED: Page(
        401,
        Text("Autre moyen d'identification requis", "Another login method is required"),
        Text(
            "Cette page exige un moyen d'identification que votre session n'a pas utilisé.",
            "This page requires a login method your session did not use.",
        ),
        offer_login=True,
    ),
    Reason.LOGIN_TOO_OLD: Page(
        401,
        Text("Identification trop ancienne", "Your login is too old"),
        Text(
            "Pour cette opération sensible, confirmez votre identité : identifiez-vous de nouveau.",
            "This sensitive operation needs a recent login: please log in again.",
        ),
        offer_login=True,
    ),
    Reason.AUTH_MODE_NOT_ACCEPTED: Page(
        401,
        Text("Carte CPS requise", "CPS card required"),
        Text(
            "Cette page exige une identification par carte CPS (directement ou dans Pro Santé Connect).",
            "This page requires a CPS card login (directly or at Pro Santé Connect).",
        ),
        offer_login=True,
    ),
    Reason.PROFESSION_NOT_ALLOWED: Page(
        403,
        Text("Accès réservé", "Restricted access"),
        Text(
            "Votre profession ne donne pas accès à cette page.",
            "Your profession does not give access to this page.",
        ),
    ),
    Reason.STAFF_CARD_NOT_ALLOWED: Page(
        403,
        Text("Carte non admise", "Card not accepted"),
        Text(
            "Les cartes d'établissement et de personnel ne donnent pas accès à cette page.",
            "Establishment and staff cards do not give access to this page.",
        ),
    ),
    Reason.NO_MATCHING_RULE: Page(
        403,
        Text("Accès refusé", "Access denied"),
        Text("Aucune règle n'autorise l'accès à cette adresse.", "No rule allows access to this address."),
    ),
    Reason.DENIED_BY_RULE: Page(
        403,
        Text("Accès refusé", "Access denied"),
        Text("Cette adresse n'est pas accessible par ce portail.", "This address is not reachable here."),
    ),
    Reason.BAD_REQUEST_PATH: Page(
        400,
        Text("Adresse invalide", "Invalid address"),
        Text(
            "L'adresse demandée est mal formée ou ambiguë.",
            "The requested address is malformed or ambiguous.",
        ),
    ),
    Reason.BAD_HOST: Page(
        400,
        Text("Adresse invalide", "Invalid address"),
        Text("Le nom de site demandé est mal formé.", "The requested host name is malformed."),
    ),
    Reason.INTERNAL_ERROR: Page(
        500,
        Text("Erreur interne de la passerelle", "Gateway internal error"),
        Text(
            "La demande n'a pas pu être traitée. L'incident est enregistré ; réessayez dans quelques instants.",
            "The request could not be handled. The incident is recorded; please try again in a few moments.",
        ),
    ),
    Reason.UPSTREAM_UNAVAILABLE: Page(
        502,
        Text("Service momentanément indisponible", "Service temporarily unavailable"),
        Text(
            "Le portail ne répond pas. Réessayez dans quelques instants.",
            "The portal is not answering. Please try again in a few moments.",
        ),
    ),
    Reason.UPSTREAM_TIMEOUT: Page(
        504,
        Text("Le portail a mis trop de temps à répondre", "The portal took too long to answer"),
        Text("Réessayez dans quelques instants.", "Please try again in a few moments."),
    ),
    Reason.SESSION_STORE_UNAVAILABLE: Page(
        503,
        Text("Service momentanément indisponible", "Service temporarily unavailable"),
        Text(
            "Votre session ne peut pas être vérifiée pour le moment. Réessayez dans quelques instants.",
            "Your session cannot be checked right now. Please try again in a few moments.",
        ),
    ),
    Reason.LIMITS_UNAVAILABLE: Page(
        503,
        Text("Service momentanément indisponible", "Service temporarily unavailable"),
        Text(
            "Les contrôles de volume ne peuvent pas être effectués pour le moment. Réessayez dans quelques instants.",
            "Access-volume checks cannot be made right now. Please try again in a few moments.",
        ),
    ),
    Reason.CSRF_FAILED: Page(
        403,
        Text("Formulaire expiré", "Form expired"),
        Text(
            "Le formulaire a expiré ou ne vient pas de ce site. Recommencez.",
            "The form expired. Start again.",
        ),
    ),
    Reason.RATE_LIMITED: Page(
        429,
        Text("Trop de tentatives", "Too many attempts"),
        Text("Patientez avant de réessayer.", "Please wait before trying again."),
    ),
    Reason.BANNED: Page(
        429,
        Text("Identification temporairement bloquée", "Login temporarily blocked"),
        Text(
            "Trop d'échecs d'identification : réessayez plus tard.",
            "Too many failed logins: please try again later.",
        ),
    ),
    Reason.QUOTA_EXCEEDED: Page(
        429,
        Text("Volume de consultation dépassé", "Access volume exceeded"),
        Text(
            "Vous avez consulté un nombre inhabituel de dossiers. L'accès est suspendu ; l'incident est signalé.",
            "You have opened an unusual number of records. Access is suspended and the event is reported.",
        ),
        offer_login=True,
    ),
    Reason.CARD_MISSING: Page(
        401,
        Text("Carte CPS non détectée", "CPS card not detected"),
        Text(
            "Aucun certificat de carte n'a été présenté. Insérez votre carte CPS et réessayez.",
            "No card certificate was presented. Insert your CPS card and try again.",
        ),
        offer_login=True,
    ),
    Reason.CARD_UNTRUSTED: Page(
        403,
        Text("Carte non reconnue", "Card not recognised"),
        Text(
            "Le certificat présenté n'a pas été émis par l'IGC-Santé.",
            "The certificate presented was not issued by IGC-Santé.",
        ),
    ),
    Reason.CARD_EXPIRED: Page(
        403,
        Text("Carte expirée", "Card expired"),
        Text("Le certificat de votre carte CPS a expiré.", "Your CPS card's certificate has expired."),
    ),
    Reason.CARD_NOT_YET_VALID: Page(
        403,
        Text("Carte pas encore valide", "Card not yet valid"),
        Text(
            "Le certificat de votre carte n'est pas encore valide.",
            "Your card's certificate is not yet valid.",
        ),
    ),
    Reason.CARD_REVOKED: Page(
        403,
        Text("Carte révoquée", "Card revoked"),
        Text(
            "Le certificat de cette carte CPS a été révoqué (carte perdue, volée ou remplacée).",
            "This CPS card's certificate has been revoked (lost, stolen or replaced card).",
        ),
    ),
    Reason.CARD_BAD_KEY_USAGE: Page(
        403,
        Text("Certificat non admis", "Certificate not accepted"),
        Text(
            "Ce certificat ne sert pas à l'authentification.",
            "This certificate is not an authentication certificate.",
        ),
    ),
    Reason.CARD_UNKNOWN_PROFESSION: Page(
        403,
        Text("Profession non reconnue", "Profession not recognised"),
        Text(
            "La profession inscrite sur la carte n'est pas reconnue.",
            "The profession written on the card is not recognised.",
        ),
    ),
    Reason.CARD_MALFORMED: Page(
        400,
        Text("Certificat illisible", "Unreadable certificate"),
        Text("Le certificat présenté est illisible.", "The certificate presented cannot be read."),
    ),
    Reason.CRL_UNAVAILABLE: Page(
        503,
        Text("Vérification de la carte impossible", "Card check unavailable"),
        Text(
            "La liste des cartes révoquées n'est pas à jour : les identifications par carte sont suspendues.",
            "The card revocation list is out of date: card logins are suspended.",
        ),
    ),
    Reason.CHALLENGE_INVALID: Page(
        401,
        Text("Défi expiré ou déjà utilisé", "Challenge expired or already used"),
        _LOGIN_AGAIN,
    ),
    Reason.SIGNATURE_INVALID: Page(
        401,
        Text("Signature invalide", "Invalid signature"),
        Text(
            "La signature ne correspond pas au certificat de la carte.",
            "The signature does not match the card.",
        ),
    ),
    Reason.IDP_UNAVAILABLE: Page(
        503,
        Text("Pro Santé Connect indisponible", "Pro Santé Connect unavailable"),
        Text(
            "Pro Santé Connect ne répond pas. Réessayez plus tard ou utilisez votre carte CPS.",
            "Pro Santé Connect is not answering. Try again later or use your CPS card.",
        ),
        offer_login=True,
    ),
    Reason.LOGIN_CANCELLED: Page(
        401,
        Text("Identification annulée", "Login cancelled"),
        Text("Vous avez annulé l'identification.", "You cancelled the login."),
        offer_login=True,
    ),
    Reason.STATE_MISMATCH: Page(
        400,
        Text("Identification expirée", "Login expired"),
        Text(
            "Cette réponse d'identification est expirée, déjà utilisée ou ne vient pas de ce navigateur.",
            "This login response is expired, already used, or was not started in this browser.",
        ),
        offer_login=True,
    ),
    Reason.TOKEN_INVALID: Page(
        401,
        Text("Identification refusée", "Login refused"),
        Text(
            "La réponse de Pro Santé Connect n'a pas pu être vérifiée.",
            "The answer from Pro Santé Connect could not be verified.",
        ),
        offer_login=True,
    ),
    Reason.ACR_NOT_ACCEPTED: Page(
        403,
        Text("Niveau d'identification insuffisant", "Login assurance too low"),
        Text(
            "Le niveau de garantie de cette identification n'est pas accepté.",
            "The assurance level of this login is not accepted.",
        ),
        offer_login=True,
    ),
    Reason.IDP_ERROR: Page(
        502,
        Text("Pro Santé Connect a refusé la demande", "Pro Santé Connect refused the request"),
        Text(
            "Pro Santé Connect n'a pas accepté la demande d'identification. "
            "Réessayez ou utilisez votre carte CPS.",
            "Pro Santé Connect did not accept the login request. Try again or use your CPS card.",
        ),
        offer_login=True,
    ),
}
_FALLBACK = Page(403, Text("Accès refusé", "Access denied"), Text("Accès refusé.", "Access denied."))

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; form-action 'self' https:; frame-ancestors 'none'",
    ),
)


def page_for(reason: Reason) -> Page:
    return PAGES.get(reason, _FALLBACK)


def language_of(request: Request, default: str) -> str:
    best = request.accept_languages.best_match(LANGUAGES)
    return best or default


def wants_html(request: Request) -> bool:
    """A page for browsers; JSON for API clients and for requests that themselves carry JSON."""
    if request.is_json:
        return False
    accept = request.accept_mimetypes
    return accept.accept_html or not accept.provided


@dataclass(frozen=True, slots=True)
class LoginLinks:
    """Where the login choices on a page lead (None: that method is not configured here)."""

    card: str | None
    ecps: str | None


def refusal(
    reason: Reason,
    request: Request,
    *,
    default_language: str,
    login: LoginLinks | None = None,
    request_id: str = "",
    retry_after: int | None = None,
    as_json: bool = False,
) -> Response:
    """The refusal page (or JSON for API clients; always JSON with ``as_json``, for JSON-only endpoints)."""
    page = page_for(reason)
    language = language_of(request, default_language)
    if not as_json and wants_html(request):
        body = render_template(
            "page.html",
            lang=language,
            title=page.title(language),
            message=page.message(language),
            reason=reason.value,
            login=login if page.offer_login else None,
            request_id=request_id,
            labels=_LABELS,
        )
        response = Response(body, page.status, content_type="text/html; charset=utf-8")
    else:
        payload: dict[str, object] = {
            "error": reason.value,
            "message": page.message(language),
            "request_id": request_id,
        }
        if login is not None and page.offer_login:
            payload["login"] = {k: v for k, v in (("card", login.card), ("ecps", login.ecps)) if v}
        response = Response(json.dumps(payload), page.status, content_type="application/json")
    if page.status == 401:
        response.headers["WWW-Authenticate"] = 'CPS realm="gateway"'
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, int(retry_after)))
    response.headers["X-Gateway-Reason"] = reason.value
    response.headers.extend(SECURITY_HEADERS)
    return response


def login_link(base: str, next_path: str) -> str:
    return f"{base}?next={quote(next_path, safe='/')}"


_LABELS = {
    "fr": {
        "choose": "Choisissez votre moyen d'identification :",
        "card": "Carte CPS",
        "card_help": "Insérez votre carte dans le lecteur avant de cliquer.",
        "ecps": "e-CPS (Pro Santé Connect)",
        "ecps_help": "Validez la connexion dans l'application e-CPS de votre téléphone.",
        "none": "Aucun moyen d'identification n'est configuré sur cette passerelle.",
        "reference": "Référence",
    },
    "en": {
        "choose": "Choose how to log in:",
        "card": "CPS card",
        "card_help": "Insert your card in the reader before clicking.",
        "ecps": "e-CPS (Pro Santé Connect)",
        "ecps_help": "Approve the login in the e-CPS app on your phone.",
        "none": "No login method is configured on this gateway.",
        "reference": "Reference",
    },
}
