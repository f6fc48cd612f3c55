from django.urls import path

from tenants.apis import TenantPolicyApi

urlpatterns = [
    path("tenant-policy", TenantPolicyApi.as_view(), name="tenant-policy"),
]
