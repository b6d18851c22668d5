from tests.support.pki import dev_pki  # noqa: F401 - fixture
from tests.support.softhsm import softhsm_cards  # noqa: F401 - fixture
