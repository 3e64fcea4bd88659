"""``python -m digits_cnn --devices 4 --out digits-data``: write device files and a reference file."""

from digits_cnn.data import main

main()
