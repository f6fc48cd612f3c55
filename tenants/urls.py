from django.urls import path

from tenants.apis import ApiKeyDetailApi, ApiKeyListApi, TenantPolicyApi, WebhookSecretApi

urlpatterns = [
    path("tenant-policy", TenantPolicyApi.as_view(), name="tenant-policy"),
    path("api-keys", ApiKeyListApi.as_view(), name="api-keys"),
    path("api-keys/<str:key_id>", ApiKeyDetailApi.as_view(), name="api-key-detail"),
    path("webhook-secret", WebhookSecretApi.as_view(), name="webhook-secret"),
]
