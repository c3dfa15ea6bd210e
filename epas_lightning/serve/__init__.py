"""``serve``: one trained model over the OpenAI completions and chat APIs, each request at the sharing region it picks.

Needs the ``serve`` extra (LitServe); :mod:`epas_lightning.serve.command` imports it only when the command runs.
"""
