"""Run configs shipped with the package: ``frugalm train --config NAME`` (tiny, small, medium, deepseek-v3).

They live here, not only in the repository's ``configs/`` (which links to these files), so a plain
``pip install`` can run the default without a checkout. Read them with
`frugalm.train.config.embedded_config_text`.
"""
