"""Example app for workerkit: a shop that sends receipts, makes thumbnails and keeps an audit log.

* :mod:`workers.receipts` - ``orders.placed`` events -> receipt e-mails (async handler, pydantic).
* :mod:`workers.thumbnails` - thumbnail tasks (plain ``def`` handler, CPU work in the thread pool).
* :mod:`workers.audit` - every ``orders.*`` and ``images.*`` event -> a JSON-lines audit file.
* :mod:`workers.webapp` - a WSGI web service publishing ``orders.placed`` on ``POST /orders``.
* :mod:`workers.produce` - a script publishing orders (some invalid) and images from threads.

The e-mail "sending" is fake on purpose: receipts go to an outbox file, not to an SMTP server.
Application settings (file paths) come from plain environment variables without the
``WORKERKIT_`` prefix, which is reserved for workerkit's own settings.
"""
