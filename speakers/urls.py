from django.urls import path

from speakers.apis import SpeakerDetailApi, SpeakerListApi

urlpatterns = [
    path("speakers", SpeakerListApi.as_view(), name="speakers"),
    path("speakers/<str:speaker_id>", SpeakerDetailApi.as_view(), name="speaker-detail"),
]
