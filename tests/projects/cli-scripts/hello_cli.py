import click


@click.command()
@click.version_option(package_name="hello-cli")
@click.argument("name", default="world")
def main(name: str) -> None:
    click.echo(f"hello, {name}")
