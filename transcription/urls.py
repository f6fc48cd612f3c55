from django.urls import path

from transcription.apis import TranscribeApi, TranscribeJobApi

urlpatterns = [
    path("transcribe", TranscribeApi.as_view(), name="transcribe"),
    path("transcribe/jobs/<str:job_id>", TranscribeJobApi.as_view(), name="transcribe-job"),
]
