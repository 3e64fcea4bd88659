"""An aicfl example app: a small CNN on scikit-learn's 8x8 digits, federated across devices.

Install it beside ``aicfl[agent]`` on every device (``pip install ./examples/digits_cnn``) and name
it in a job spec as ``[model] app = "digits_cnn:app"`` with ``app_version`` set to the installed
version. ``digits_cnn.data`` reads and checks device files and writes a label-skewed split.
"""

from digits_cnn.cnn import DigitsCNN, DigitsNet, app, installed_version

__all__ = ["DigitsCNN", "DigitsNet", "app", "installed_version"]
