from django.db import models


class Category(models.Model):
    name = models.CharField(max_length=40)


class Product(models.Model):
    name = models.CharField(max_length=40)
    category = models.ForeignKey(Category, on_delete=models.CASCADE, null=True)

    class Meta:
        ordering = ["name"]

    def label(self):
        return f"product {self.name}"
