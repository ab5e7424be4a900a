from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render

from shopapp.models import Product


def index(request):
    return HttpResponse("index")


def product(request, pk):
    return render(request, "shopapp/product.html", {"product": get_object_or_404(Product, pk=pk)})
