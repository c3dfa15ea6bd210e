"""Run a function right after Lightning registers its signal handlers in ``fit``, ``validate`` or ``test``: the first
moment its SIGTERM handler can be replaced.

``Trainer._run`` registers them (``trainer._signal_connector.register_signal_handlers()``) after the ``setup`` hooks,
``on_fit_start``, the resume and the restored training state, and before the run stage's barrier, the sanity validation
and the training loader's set-up (``validate``/``test``: the evaluation); no callback hook runs in between.
:func:`after_signal_registration` wraps that one call on the trainer's connector alone (whatever answers it there:
Lightning's method, or one a script set on that connector) and unwraps it as it runs, or
:func:`forget_signal_registration` does for a run that failed before it, putting back what was there. Lightning
internals relied on: the ``Trainer._signal_connector`` attribute and its ``register_signal_handlers`` method, looked up
on the instance; its ``teardown`` (as the run ends, however it ends) still puts back the handlers found before the
registration, whatever replaced its own since.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import Trainer

_REGISTER = "register_signal_handlers"
_WRAPPED = "_epas_wrapped"  # on the wrapper: the connector's own attribute it replaced (None: the class's method)


def after_signal_registration(trainer: Trainer, then: Callable[[], None]) -> None:
    """Call ``then`` once, right after ``trainer`` registers its signal handlers in the run under way."""
    forget_signal_registration(trainer)
    connector = trainer._signal_connector
    register = getattr(connector, _REGISTER)

    def register_then() -> None:
        forget_signal_registration(trainer)
        register()
        then()

    setattr(register_then, _WRAPPED, vars(connector).get(_REGISTER))
    setattr(connector, _REGISTER, register_then)


def forget_signal_registration(trainer: Trainer) -> None:
    """Drop the call :func:`after_signal_registration` set up and that has not run (a run that failed before):
    what answered the registration before answers it again."""
    attributes = vars(trainer._signal_connector)
    wrapper = attributes.get(_REGISTER)
    if not hasattr(wrapper, _WRAPPED):  # none, or not ours
        return
    if (replaced := getattr(wrapper, _WRAPPED)) is None:
        del attributes[_REGISTER]
    else:
        attributes[_REGISTER] = replaced
