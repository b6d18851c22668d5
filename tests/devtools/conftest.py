from tests.support.pki import dev_pki, own_pki  # noqa: F401 - fixtures
from tests.support.softhsm import softhsm_cards  # noqa: F401 - fixture
