from django.apps import AppConfig


class TenantsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "tenants"

    def ready(self) -> None:
        from scaiecho_site import schema  # noqa: F401  (registers the OpenAPI auth extension)
