from django.db import migrations, models


def first_question(apps, schema_editor):
    apps.get_model("polls", "Question").objects.create(text="Tea or coffee?")


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Question",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("text", models.CharField(max_length=200)),
            ],
            options={"ordering": ["text"]},
        ),
        migrations.RunPython(first_question, migrations.RunPython.noop),
    ]
