from django.urls import path

from transcription.apis import OpenAITranscriptionApi

urlpatterns = [
    path("audio/transcriptions", OpenAITranscriptionApi.as_view(), name="oai-transcriptions"),
]
