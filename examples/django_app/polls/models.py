from django.db import models


class Question(models.Model):
    text = models.CharField(max_length=200)

    class Meta:
        ordering = ["text"]

    def label(self) -> str:
        return f"Q: {self.text}"
