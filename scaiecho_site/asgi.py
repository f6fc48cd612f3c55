"""ASGI entry point: HTTP through Django (behind the body limit), WebSockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "scaiecho_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from scaiecho_site.bodylimit import BodyLimitMiddleware, install_daphne_guard  # noqa: E402
from scaiecho_site.checks import enforce_startup_checks  # noqa: E402
from scaiecho_site.routing import websocket_urlpatterns  # noqa: E402
from streaming.middleware import TokenScopeMiddleware  # noqa: E402
from streaming.worker import preload_embedded_worker  # noqa: E402

enforce_startup_checks()
# With the embedded defaults this process runs the stream worker: load its model now, while the
# server starts, not when the first stream is waiting for it.
preload_embedded_worker()
# daphne receives a whole request body before it calls the application; this makes it refuse an
# oversize body while it arrives (scaiecho_site.bodylimit).
install_daphne_guard()

application = ProtocolTypeRouter(
    {
        "http": BodyLimitMiddleware(django_asgi_app),
        "websocket": TokenScopeMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
