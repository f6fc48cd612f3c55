from django.apps import AppConfig


class ScaiEchoSiteConfig(AppConfig):
    name = "scaiecho_site"
    label = "scaiecho_site"
    verbose_name = "ScaiEcho"

    def ready(self) -> None:
        from scaiecho_site import checks  # noqa: F401  (registers the system checks)
